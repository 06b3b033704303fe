"""A small gRPC client for the orthrus.v1.Orthrus service, and the `orthrus client` command.

    from orthrus_runtime.client import OrthrusClient
    with OrthrusClient("localhost:9000", api_key="...") as c:
        for r in c.generate("Hello", max_tokens=32, temperature=0):
            print(r.text, end="", flush=True)

The service runs behind Ray Serve's gRPC proxy: `application` picks the Serve
application when several are deployed, and `api_key` is sent as the
`authorization: Bearer <key>` metadata.

Log-probabilities and choices: `logprobs=k` gives every output token's
log-probability with its k most likely alternatives (`r.logprobs`, one per entry
of `r.token_ids`), `prompt_logprobs=k` the same for the prompt (`r.prompt_logprobs`,
on a choice's first message; the first entry has no logprob), `n` asks for several
choices (`r.index`; a Complete answer lists them in `r.choices`), and `echo` puts the
prompt's text first. `collect` gathers a stream into one Choice per index.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
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
    logprobs: Optional[int] = None,
    prompt_logprobs: Optional[int] = None,
    n: Optional[int] = None,
    echo: bool = False,
) -> pb.GenerateRequest:
    """A GenerateRequest from keyword arguments; None leaves a field to the server's default."""
    if mode not in _MODES:
        raise ValueError(f"mode must be 'orthrus' or 'ar', got {mode!r}")
    req = pb.GenerateRequest(mode=_MODES[mode], request_id=request_id or "", echo=echo)
    if prompt is not None:
        req.prompt = prompt
    for m in messages or ():
        req.messages.add(role=m["role"], content=m["content"])
    if prompt_token_ids is not None:
        req.prompt_token_ids.extend(prompt_token_ids)
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_k", top_k),
                        ("top_p", top_p), ("seed", seed), ("logprobs", logprobs),
                        ("prompt_logprobs", prompt_logprobs), ("n", n)):
        if value is not None:
            setattr(req, name, value)
    if stop:
        req.stop.extend(stop)
    return req


@dataclass
class Choice:
    """One choice of a request, gathered from its messages (see collect)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    final: Optional[pb.GenerateResponse] = None  # the finished message: finish_reason, usage, stats

    def add(self, r: pb.GenerateResponse) -> None:
        self.text += r.text
        self.token_ids.extend(r.token_ids)
        self.logprobs.extend(r.logprobs)
        self.prompt_logprobs.extend(r.prompt_logprobs)
        if r.finished:
            self.final = r


def collect(responses: Iterable[pb.GenerateResponse]) -> list[Choice]:
    """The choices of a Generate stream (messages of several choices interleave) or of a
    Complete answer (`choices` when n > 1), by index."""
    by_index: dict[int, Choice] = {}
    for r in responses:
        for part in (r.choices or [r]):
            by_index.setdefault(part.index, Choice(part.index)).add(part)
    return [by_index[i] for i in sorted(by_index)]


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
    parser.add_argument("--logprobs", type=int, default=None, metavar="K",
                        help="print each output token's log-probability and its K most likely alternatives "
                             "(0..20) to stderr; with --echo the prompt's too")
    parser.add_argument("--n", type=int, default=None, metavar="N",
                        help="N choices (1..16), printed one after the other, labelled by index")
    parser.add_argument("--echo", action="store_true",
                        help="the prompt's text comes first in the output (with --max-tokens 0 and --logprobs: "
                             "score the prompt alone)")
    parser.add_argument("--api-key", default=os.environ.get("ORTHRUS_API_KEY"),
                        help="API key (default: $ORTHRUS_API_KEY)")
    parser.add_argument("--application", default=None, help="Serve application name, when several are deployed")
    parser.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    parser.add_argument("--info", action="store_true", help="print the model info and exit")
    parser.add_argument("--quiet-stats", action="store_true", help="do not print usage and acceptance stats to stderr")


def _stats_line(r: pb.GenerateResponse, index: Optional[int] = None) -> str:
    s, u = r.stats, r.usage
    return (
        (f"choice {index}: " if index is not None else "")
        + f"[{pb.FinishReason.Name(r.finish_reason).removeprefix('FINISH_REASON_').lower()}] "
        f"prompt {u.prompt_tokens} + completion {u.completion_tokens} tokens; "
        f"{s.num_cycles} cycles, {s.mean_accepted_length:.2f} tokens/cycle, "
        f"acceptance {s.acceptance_rate:.2%}"
    )


def _token(text: str, width: int = 16) -> str:
    """A token's text, quoted with its whitespace escaped, cut to `width` characters."""
    r = repr(text)
    return r if len(r) <= width else r[: width - 3] + "..."


def _logprob(t: pb.TokenLogprob) -> str:
    return f"{t.logprob:.3f}" if t.HasField("logprob") else "-"


def format_logprobs(choice: Choice, alternatives: int = 0, labelled: bool = False) -> str:
    """A compact table of a choice's tokens and log-probabilities: prompt tokens (rows p0,
    p1, ...; the first has none) then output tokens (rows 0, 1, ...), and the alternatives
    when alternatives > 0."""
    rows = [(f"p{i}", t) for i, t in enumerate(choice.prompt_logprobs)]
    rows += [(str(i), t) for i, t in enumerate(choice.logprobs)]
    title = "log-probabilities" + (f" of choice {choice.index}" if labelled else "")
    if not rows:
        return f"{title}: none"
    width = max(len("token"), *(len(_token(t.token)) for _, t in rows))
    lines = [f"{title}:", f"  {'#':>4}  {'token':<{width}}  {'logprob':>8}" + ("  alternatives" if alternatives > 0 else "")]
    for label, t in rows:
        line = f"  {label:>4}  {_token(t.token):<{width}}  {_logprob(t):>8}"
        if alternatives > 0 and t.top:
            line += "  " + "  ".join(f"{_token(a.token)} {a.logprob:.3f}" for a in t.top)
        lines.append(line.rstrip())
    return "\n".join(lines)


def format_choices(choices: Sequence[Choice]) -> str:
    """Several choices' texts, one after the other, each under its index."""
    return "".join(f"[choice {c.index}]\n{c.text}\n" for c in choices)


def run(args: argparse.Namespace) -> int:
    with OrthrusClient(args.target, args.api_key, application=args.application, timeout=args.timeout) as client:
        try:
            if args.info:
                print(client.model_info(), end="")
                return 0
            prompt = args.prompt if args.prompt is not None else sys.stdin.read()
            n = args.n if args.n is not None else 1
            kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop=args.stop, mode=args.mode,
                          logprobs=args.logprobs, n=args.n, echo=args.echo,
                          prompt_logprobs=args.logprobs if args.echo else None)
            if args.chat or args.system is not None:
                msgs = ([{"role": "system", "content": args.system}] if args.system is not None else [])
                msgs.append({"role": "user", "content": prompt})
                call = client.generate(messages=msgs, **kwargs)
            else:
                call = client.generate(prompt, **kwargs)
            choices: dict[int, Choice] = {}
            try:
                for r in call:
                    choices.setdefault(r.index, Choice(r.index)).add(r)
                    if n == 1 and r.text:  # one choice streams; several are printed at the end
                        sys.stdout.write(r.text)
                        sys.stdout.flush()
                    if n == 1 and r.finished:
                        sys.stdout.write("\n")
            except KeyboardInterrupt:
                call.cancel()
                return 130
            gathered = [choices[i] for i in sorted(choices)]
            if n > 1:
                sys.stdout.write(format_choices(gathered))
                sys.stdout.flush()
            for c in gathered:
                if args.logprobs is not None:
                    print(format_logprobs(c, args.logprobs, labelled=n > 1), file=sys.stderr)
                if not args.quiet_stats and c.final is not None:
                    print(_stats_line(c.final, c.index if n > 1 else None), file=sys.stderr)
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
