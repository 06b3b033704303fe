"""Ray Serve application for Orthrus: engine replicas behind a gRPC + OpenAI-compatible router.

The config's import path is `deployment.app:build_app`; see deployment/configs/.
"""
