"""A small gRPC client for the orthrus.v1.Orthrus service, and the `orthrus client` command.

    from orthrus_runtime.client import OrthrusClient
    with OrthrusClient("localhost:9000", api_key="...") as c:
        for r in c.generate("Hello", max_tokens=32, temperature=0):
            print(r.text, end="", flush=True)

The service runs behind Ray Serve's gRPC proxy: `application` picks the Serve
application when several are deployed, and `api_key` is sent as the
`authorization: Bearer <key>` metadata.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Iterable, Iterator, Optional, Sequence

import grpc

from .proto import orthrus_pb2 as pb
from .proto import orthrus_pb2_grpc as pb_grpc

_MODES = {None: pb.MODE_UNSPECIFIED, "orthrus": pb.MODE_ORTHRUS, "ar": pb.MODE_AR}


def build_request(
    prompt: Optional[str] = None,
    *,
    messages: Optional[Iterable[dict]] = None,
    prompt_token_ids: Optional[Sequence[int]] = None,
    max_tokens: Optional[int] = None,
    temperature: Optional[float] = None,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
    stop: Optional[Sequence[str]] = None,
    mode: Optional[str] = None,
    request_id: Optional[str] = None,
) -> pb.GenerateRequest:
    """A GenerateRequest from keyword arguments; None leaves a field to the server's default."""
    if mode not in _MODES:
        raise ValueError(f"mode must be 'orthrus' or 'ar', got {mode!r}")
    req = pb.GenerateRequest(mode=_MODES[mode], request_id=request_id or "")
    if prompt is not None:
        req.prompt = prompt
    for m in messages or ():
        req.messages.add(role=m["role"], content=m["content"])
    if prompt_token_ids is not None:
        req.prompt_token_ids.extend(prompt_token_ids)
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_k", top_k),
                        ("top_p", top_p), ("seed", seed)):
        if value is not None:
            setattr(req, name, value)
    if stop:
        req.stop.extend(stop)
    return req


class OrthrusClient:
    def __init__(
        self,
        target: str,
        api_key: Optional[str] = None,
        *,
        application: Optional[str] = None,
        credentials: Optional[grpc.ChannelCredentials] = None,
        timeout: Optional[float] = None,
    ):
        """target: "host:port" of Serve's gRPC proxy; credentials: TLS, when the endpoint uses it."""
        self._channel = (
            grpc.secure_channel(target, credentials) if credentials is not None else grpc.insecure_channel(target)
        )
        self._stub = pb_grpc.OrthrusStub(self._channel)
        self._metadata: list[tuple[str, str]] = []
        if api_key:
            self._metadata.append(("authorization", f"Bearer {api_key}"))
        if application:
            self._metadata.append(("application", application))
        self._timeout = timeout

    def generate(self, prompt: Optional[str] = None, *, timeout: Optional[float] = None, **kwargs) -> Iterator[pb.GenerateResponse]:
        """Stream the output; the returned call is an iterator of GenerateResponse with .cancel().

        Takes the keyword arguments of build_request. Raises grpc.RpcError while
        iterating when the server refuses or fails the request.
        """
        return self._stub.Generate(build_request(prompt, **kwargs), metadata=self._metadata,
                                   timeout=timeout or self._timeout)

    def complete(self, prompt: Optional[str] = None, *, timeout: Optional[float] = None, **kwargs) -> pb.GenerateResponse:
        """The whole output in one answer (same arguments as generate)."""
        return self._stub.Complete(build_request(prompt, **kwargs), metadata=self._metadata,
                                   timeout=timeout or self._timeout)

    def model_info(self, timeout: Optional[float] = None) -> pb.ModelInfoResponse:
        return self._stub.ModelInfo(pb.ModelInfoRequest(), metadata=self._metadata, timeout=timeout or self._timeout)

    def health(self, timeout: Optional[float] = None) -> pb.HealthResponse:
        return self._stub.Health(pb.HealthRequest(), metadata=self._metadata, timeout=timeout or self._timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "OrthrusClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------- `orthrus client`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="localhost:9000", help="HOST:PORT of the gRPC endpoint (default: %(default)s)")
    parser.add_argument("--prompt", default=None, help="the prompt (default: read stdin)")
    parser.add_argument("--chat", action="store_true", help="send the prompt as a user chat message (chat template applied)")
    parser.add_argument("--system", default=None, help="a system message (implies --chat)")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None, help="0 for greedy (server default: 1.0)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    parser.add_argument("--mode", choices=["orthrus", "ar"], default=None)
    parser.add_argument("--api-key", default=os.environ.get("ORTHRUS_API_KEY"),
                        help="API key (default: $ORTHRUS_API_KEY)")
    parser.add_argument("--application", default=None, help="Serve application name, when several are deployed")
    parser.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    parser.add_argument("--info", action="store_true", help="print the model info and exit")
    parser.add_argument("--quiet-stats", action="store_true", help="do not print usage and acceptance stats to stderr")


def _stats_line(r: pb.GenerateResponse) -> str:
    s, u = r.stats, r.usage
    return (
        f"[{pb.FinishReason.Name(r.finish_reason).removeprefix('FINISH_REASON_').lower()}] "
        f"prompt {u.prompt_tokens} + completion {u.completion_tokens} tokens; "
        f"{s.num_cycles} cycles, {s.mean_accepted_length:.2f} tokens/cycle, "
        f"acceptance {s.acceptance_rate:.2%}"
    )


def run(args: argparse.Namespace) -> int:
    with OrthrusClient(args.target, args.api_key, application=args.application, timeout=args.timeout) as client:
        try:
            if args.info:
                print(client.model_info(), end="")
                return 0
            prompt = args.prompt if args.prompt is not None else sys.stdin.read()
            kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop=args.stop, mode=args.mode)
            if args.chat or args.system is not None:
                msgs = ([{"role": "system", "content": args.system}] if args.system is not None else [])
                msgs.append({"role": "user", "content": prompt})
                call = client.generate(messages=msgs, **kwargs)
            else:
                call = client.generate(prompt, **kwargs)
            try:
                for r in call:
                    if r.text:
                        sys.stdout.write(r.text)
                        sys.stdout.flush()
                    if r.finished:
                        sys.stdout.write("\n")
                        if not args.quiet_stats:
                            print(_stats_line(r), file=sys.stderr)
            except KeyboardInterrupt:
                call.cancel()
                return 130
        except grpc.RpcError as e:
            print(f"\northrus client: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        except ValueError as e:
            print(f"orthrus client: {e}", file=sys.stderr)
            return 2
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="orthrus client", description="Stream a generation from an Orthrus gRPC endpoint.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
