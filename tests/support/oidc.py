"""A tiny OIDC issuer on loopback: a discovery document and a JWKS, and tokens signed by its keys.

It runs in a thread of the test process (http.server), so in-process tests can use it; it counts
the requests it served, so tests can see when a validator fetched the key set again.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class OidcIssuer:
    """``with OidcIssuer() as issuer: token = issuer.mint(sub="alice")``."""

    def __init__(self) -> None:
        self.keys: dict[str, tuple[str, PrivateKey]] = {}
        self.published: set[str] = set()
        self.requests: dict[str, int] = {}
        self._server: ThreadingHTTPServer | None = None
        self.add_key("rsa-1", "RS256")
        self.add_key("ec-1", "ES256")

    # ---- keys -----------------------------------------------------------------

    def add_key(self, kid: str, alg: str, *, publish: bool = True) -> None:
        key: PrivateKey
        key = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            if alg == "RS256"
            else (ec.generate_private_key(ec.SECP256R1()))
        )
        self.keys[kid] = (alg, key)
        if publish:
            self.published.add(kid)

    def jwks(self) -> dict[str, Any]:
        out = []
        for kid in sorted(self.published):
            alg, key = self.keys[kid]
            codec = RSAAlgorithm if alg == "RS256" else ECAlgorithm
            jwk = json.loads(codec.to_jwk(key.public_key()))  # type: ignore[arg-type]
            out.append({**jwk, "kid": kid, "alg": alg, "use": "sig"})
        return {"keys": out}

    def mint(self, *, kid: str = "rsa-1", ttl: float = 600, **claims: Any) -> str:
        alg, key = self.keys[kid]
        now = int(time.time())
        doc: dict[str, Any] = {
            "iss": self.issuer,
            "aud": "kubellm",
            "sub": "alice",
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": uuid.uuid4().hex,
        }
        doc.update(claims)
        return jwt.encode(
            {k: v for k, v in doc.items() if v is not None}, key, algorithm=alg, headers={"kid": kid}
        )

    # ---- the server -----------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def issuer(self) -> str:
        return self.url

    @property
    def discovery_url(self) -> str:
        return f"{self.url}/.well-known/openid-configuration"

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/jwks.json"

    def __enter__(self) -> OidcIssuer:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                issuer.requests[self.path] = issuer.requests.get(self.path, 0) + 1
                if self.path == "/.well-known/openid-configuration":
                    doc: Any = {"issuer": issuer.issuer, "jwks_uri": issuer.jwks_url}
                elif self.path == "/jwks.json":
                    doc = issuer.jwks()
                else:
                    self.send_error(404)
                    return
                raw = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    def jwks_fetches(self) -> int:
        return self.requests.get("/jwks.json", 0)
