"""OCI distribution registries: `RegistryProvider` serves an image's blobs to lazy records,
`push` sends a record's chain as an image, and `pull` registers an image's layers as (lazy)
records.

A reference names its registry host (`host[:port]/repository[:tag][@digest]`); there is no
default host. Requests go over HTTPS, checked against the system's trust store (plus
`ca_file`, a PEM bundle, when given), or over plain HTTP with `insecure=True` (loopback hosts
only) or `plain_http=True` (any host: the caller named it). Access follows the registry's
`WWW-Authenticate` challenge: Basic with the credentials, or a Bearer token from the
challenge's realm (anonymous, or with the credentials: an OAuth2 POST first, the GET form
when the token server has no POST).
Credentials not given come from the files and credential helpers Docker and podman use
(`pyctrd_cache.credentials`).
Connection errors and 5xx answers are retried within a bounded budget.

Registries are not trusted (docs/security.md):

- Credentials and tokens go only to the registry's own origin (scheme, host and port): a
  request to a `Location` or redirect elsewhere carries none, and only the registry's own
  401 challenges are answered. A token realm must be HTTPS, unless the registry itself is
  plain HTTP.
- Bodies are read raw and decoded here, in bounded steps, and capped on the decoded bytes:
  `MAX_MANIFEST` for a manifest or index, `MAX_TOKEN_ANSWER` for a token server's answer,
  `MAX_ERROR_BODY` for an error body (longer ones are not read).
- Every answer has a deadline: its body must have arrived `timeout` seconds
  (`DEFAULT_TIMEOUT`, or `$PYCTRD_CACHE_HTTP_TIMEOUT`) after its headers, a blob's its size at
  `MIN_THROUGHPUT` bytes a second later still. Connecting waits at most 10 s, and any one
  read (of the headers too) at most `timeout`.
- A reference longer than `MAX_REFERENCE` characters, or carrying credentials
  (`user:password@host`), is refused without echoing them.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import gzip
import hashlib
import io
import json
import math
import os
import re
import ssl
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, Final

import httpx
import tenacity
import zstandard

from ._tasks import TaskGroup, unwrapped
from .blobs import DISTRIBUTION_SOURCE_PREFIX
from .client import Descriptor
from .compression import Compression, parse_digest
from .credentials import Credentials, find_credentials
from .errors import AuthError, CacheError, InvalidError, NotFoundError, UnavailableError
from .manager import Manager
from .oci import (
    INDEXES,
    MANIFESTS,
    MAX_JSON,
    image_of,
    layer_descriptors,
    parse_json_blob,
    register_layers,
    resolve_manifest,
)
from .refs import ImmutableRef
from .remote import ProgressCallback, ProgressEvent

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_ERROR_BODY",
    "MAX_MANIFEST",
    "MAX_REFERENCE",
    "MAX_TOKEN_ANSWER",
    "MIN_THROUGHPUT",
    "TIMEOUT_ENV",
    "Credentials",
    "Reference",
    "RegistryProvider",
    "parse_reference",
    "pull",
    "push",
]

_COMPONENT: Final = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST: Final = (
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])"
)
_REFERENCE_RE: Final = re.compile(
    rf"^(?P<host>{_HOST}(?::[0-9]+)?)/(?P<repository>{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>[A-Za-z0-9_+.-]+:[0-9a-fA-F]+))?$"
)
_LOOPBACK_HOSTS: Final = ("localhost", "127.0.0.1", "[::1]")
_ACCEPT: Final = ", ".join((*MANIFESTS, *INDEXES))
_CHUNK: Final = 1 << 20
MAX_MANIFEST: Final = 4 << 20
"""The largest manifest or index read from a registry (the distribution registry's own
limit), in decoded bytes."""
MAX_TOKEN_ANSWER: Final = 4 << 20
"""The largest token server answer read, in decoded bytes."""
MAX_ERROR_BODY: Final = 64 << 10
"""The largest error body read for its message; a longer one is reported by status only."""
MAX_REFERENCE: Final = 255
"""The longest `host[:port]/repository` accepted (the distribution spec's 255 characters)."""
DEFAULT_TIMEOUT: Final = 30.0
"""Seconds an answer's body may take once its headers arrived (a blob's gets more, by
`MIN_THROUGHPUT`), and the longest wait for any one read."""
TIMEOUT_ENV: Final = "PYCTRD_CACHE_HTTP_TIMEOUT"
"""The environment variable that sets the timeout when the caller gives none."""
MIN_THROUGHPUT: Final = 64 << 10
"""Bytes a second a blob must arrive at, at least: its deadline is the timeout plus its size
over this."""
_CONNECT_TIMEOUT: Final = 10.0
_MAX_REDIRECTS: Final = 10
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_RETRY_ATTEMPTS: Final = 4
_RETRY_SECONDS: Final = 30.0
_CHALLENGE_RE: Final = re.compile(r'([A-Za-z_][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


# References.


@dataclass(frozen=True)
class Reference:
    """`host[:port]/repository[:tag][@digest]`."""

    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def tag_or_digest(self) -> str:
        """What the manifest endpoint is asked for: the digest, else the tag, else `latest`."""
        return self.digest or self.tag or "latest"

    @property
    def hostname(self) -> str:
        """The host without its port."""
        if self.host.startswith("["):
            return self.host.partition("]")[0] + "]"
        return self.host.rsplit(":", 1)[0] if ":" in self.host else self.host

    def __str__(self) -> str:
        text = f"{self.host}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


_USERINFO_RE: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)?[^/]*@")


def _shown_reference(text: str) -> str:
    """`text` fit for an error message: credentials (`user:password@`) masked, and cut to
    200 characters."""
    masked = _USERINFO_RE.sub(lambda m: (m[1] or "") + "***@", text, count=1)
    if len(masked) > 200:
        return f"{masked[:150]!r}... ({len(text)} characters)"
    return repr(masked)


def parse_reference(text: str) -> Reference:
    """Parses `host[:port]/repository[:tag][@digest]`; `InvalidError` when the reference is
    malformed, names no registry host (a first component without `.` or `:` that is not
    `localhost`), carries credentials, or is longer than `MAX_REFERENCE` before its tag.
    The error never shows the credentials."""
    if _USERINFO_RE.match(text):
        raise InvalidError(
            f"invalid registry reference {_shown_reference(text)}: credentials do not belong "
            "in a reference (they come from the caller or the Docker config)"
        )
    name = re.split(r"[@]|:(?=[^/]*$)", text, maxsplit=1)[0]
    if len(name) > MAX_REFERENCE:
        raise InvalidError(
            f"invalid registry reference {_shown_reference(text)}: HOST[:PORT]/REPOSITORY has "
            f"{len(name)} characters, at most {MAX_REFERENCE}"
        )
    m = _REFERENCE_RE.match(text)
    host = text.partition("/")[0]
    if m is None or not ("." in host or ":" in host or host == "localhost"):
        raise InvalidError(
            f"invalid registry reference {_shown_reference(text)} "
            "(expected HOST[:PORT]/REPOSITORY[:TAG][@DIGEST], with the registry's host)"
        )
    digest = m["digest"]
    if digest is not None:
        parse_digest(digest, what=f"digest of {text}")
    return Reference(m["host"], m["repository"], m["tag"], digest)


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    """The scheme (lower case) and parameters of a `WWW-Authenticate` header."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m[1].lower(): (m[2].replace('\\"', '"') if m[2] is not None else m[3])
        for m in _CHALLENGE_RE.finditer(rest)
    }
    return scheme.lower(), params


# The HTTP session.


class _Retryable(Exception):
    """A 5xx answer, retried within the budget."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        super().__init__(f"HTTP {response.status_code}")


Body = bytes | Callable[[], Iterable[bytes]] | None


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    """Scheme, host and port (the scheme's default when none is given)."""
    return url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme)


def timeout_from_environment() -> float:
    """`$PYCTRD_CACHE_HTTP_TIMEOUT` (seconds), else `DEFAULT_TIMEOUT`; `InvalidError` when it is
    not a positive number."""
    text = os.environ.get(TIMEOUT_ENV, "")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise InvalidError(f"${TIMEOUT_ENV}={text!r} is not a number of seconds") from None
    return check_timeout(value)


def check_timeout(value: object) -> float:
    """`value` if it is a positive, finite number of seconds."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise InvalidError(f"invalid HTTP timeout {value!r}: expected a positive number of seconds")
    return float(value)


class _Answer:
    """A response read whole: the status, headers and URL, and the decoded body, or None
    when it was larger than the cap it was read with."""

    def __init__(self, response: httpx.Response, body: bytes | None, limit: int) -> None:
        self.status_code = response.status_code
        self.headers = response.headers
        self.url = response.url
        self.body = body
        self.limit = limit


class _Session:
    """One registry host: an httpx client (connection reuse), the credentials and the
    tokens got so far (by scope). Thread-safe."""

    def __init__(
        self, ref: Reference, auth: Credentials | None, tls: _TLS, timeout: float | None
    ) -> None:
        if tls.insecure and not tls.plain_http and ref.hostname not in _LOOPBACK_HOSTS:
            raise InvalidError(
                f"{ref}: insecure (plain HTTP) is allowed only on loopback hosts; "
                "plain_http (--plain-http) allows it for a host you name"
            )
        self.ref = ref
        plain = tls.insecure or tls.plain_http
        self.base = f"{'http' if plain else 'https'}://{ref.host}"
        self.origin = _origin(httpx.URL(self.base))
        self.timeout = timeout_from_environment() if timeout is None else check_timeout(timeout)
        self._auth = auth if auth is not None else find_credentials(ref.host)
        # Bodies are decoded here, in bounded steps: httpx's own decoding is unbounded.
        self._http = httpx.Client(
            timeout=httpx.Timeout(self.timeout, connect=min(_CONNECT_TIMEOUT, self.timeout)),
            follow_redirects=False,
            headers={"Accept-Encoding": "identity"},
            verify=tls.context(),
        )
        self._finalizer = weakref.finalize(self, self._http.close)
        self._mu = threading.Lock()
        self._scheme = ""
        self._tokens: dict[str, str] = {}

    def close(self) -> None:
        self._finalizer()

    def url(self, repository: str, kind: str, name: str = "") -> str:
        return f"{self.base}/v2/{repository}/{kind}/{name}"

    def deadline(self, size: int = 0) -> float:
        """When a body whose headers arrived now must have arrived: the timeout, plus `size`
        bytes at `MIN_THROUGHPUT`."""
        return time.monotonic() + self.timeout + size / MIN_THROUGHPUT

    def request(
        self,
        method: str,
        url: str,
        *,
        scopes: Iterable[str],
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        body: Body = None,
        follow_redirects: bool = False,
        limit: int = MAX_ERROR_BODY,
    ) -> _Answer:
        """`stream`, and its answer read whole within the deadline: a body over `limit`
        decoded bytes is not kept (`body` None)."""
        response = self.stream(
            method,
            url,
            scopes=scopes,
            headers=headers,
            params=params,
            body=body,
            follow_redirects=follow_redirects,
        )
        with contextlib.closing(response):
            return _Answer(response, self.read(response, limit), limit)

    def read(self, response: httpx.Response, limit: int) -> bytes | None:
        """The decoded body, read within the deadline, or None once it is over `limit`
        bytes."""
        stream = _decoded(response, self.ref, self.deadline())
        data = stream.read(limit + 1)
        return data if len(data) <= limit else None

    def stream(
        self,
        method: str,
        url: str,
        *,
        scopes: Iterable[str],
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        body: Body = None,
        follow_redirects: bool = False,
    ) -> httpx.Response:
        """Sends the request (following up to `_MAX_REDIRECTS` redirects when asked) with
        the authorization the registry asked for, to the registry's origin only; answers
        the registry's own 401 challenge once. The response's body is not read: close it."""
        scope = " ".join(sorted(set(scopes)))

        def send() -> httpx.Response:
            return self._send(method, url, scope, headers, params, body, follow_redirects)

        response = send()
        if response.status_code != 401:
            return response
        response.close()
        if _origin(response.url) != self.origin:
            # Another host's challenge is not answered with this registry's credentials.
            raise AuthError(
                f"{self.ref}: {response.url.host} (redirected to from the registry) refused "
                "access; the registry's credentials are not sent to another host"
            )
        self._answer(response, scope)
        response = send()
        if response.status_code == 401:
            response.close()
            raise AuthError(f"{self.ref}: the registry refused access ({self._who()})")
        return response

    def _who(self) -> str:
        if self._auth is None:
            return "no credentials given or in the Docker config"
        if self._auth.identity_token:
            return "with an identity token"
        return f"as user {self._auth.username!r}"

    def _authorization(self, scope: str, url: httpx.URL) -> str | None:
        if _origin(url) != self.origin:
            return None
        with self._mu:
            if self._scheme == "basic" and self._auth is not None:
                pair = f"{self._auth.username}:{self._auth.password}".encode()
                return "Basic " + base64.b64encode(pair).decode()
            if self._scheme == "bearer" and scope in self._tokens:
                return "Bearer " + self._tokens[scope]
        return None

    def _send(
        self,
        method: str,
        url: str,
        scope: str,
        headers: Mapping[str, str] | None,
        params: Mapping[str, str] | None,
        body: Body,
        follow_redirects: bool,
    ) -> httpx.Response:
        def attempt() -> httpx.Response:
            target = httpx.URL(url).copy_merge_params(params) if params else httpx.URL(url)
            for _ in range(_MAX_REDIRECTS + 1):
                all_headers = dict(headers or {})
                if (authorization := self._authorization(scope, target)) is not None:
                    all_headers["Authorization"] = authorization
                content = body if isinstance(body, bytes) or body is None else body()
                request = self._http.build_request(
                    method, target, headers=all_headers, content=content
                )
                response = self._http.send(request, stream=True)
                if not (follow_redirects and response.has_redirect_location):
                    return response
                response.close()
                target = response.url.join(response.headers["Location"])
            raise CacheError(f"{self.ref}: {method} {url}: more than {_MAX_REDIRECTS} redirects")

        return self._retrying(f"{method} {url}", attempt)

    def _retrying(self, what: str, send: Callable[[], httpx.Response]) -> httpx.Response:
        """`send()`, again after a connection error or a 5xx answer, within the budget."""

        def attempt() -> httpx.Response:
            response = send()
            if response.status_code >= 500:
                response.close()
                raise _Retryable(response)
            return response

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(_RETRY_ATTEMPTS)
            | tenacity.stop_after_delay(_RETRY_SECONDS),
            wait=tenacity.wait_exponential(multiplier=0.2, max=2.0),
            retry=tenacity.retry_if_exception_type((_Retryable, httpx.TransportError)),
            reraise=True,
        )
        try:
            return retrying(attempt)
        except _Retryable as err:
            raise CacheError(
                f"{self.ref}: {what} answered HTTP {err.response.status_code}"
            ) from None
        except httpx.TransportError as err:
            raise UnavailableError(f"{self.ref}: {what} failed: {err}") from err

    def _answer(self, response: httpx.Response, scope: str) -> None:
        """Takes in a 401's challenge: remembers Basic, or gets a Bearer token for `scope`."""
        header = response.headers.get("WWW-Authenticate", "")
        scheme, params = _challenge(header)
        if scheme == "basic":
            if self._auth is None or not self._auth.username:
                raise AuthError(f"{self.ref}: the registry asks for credentials ({self._who()})")
            with self._mu:
                self._scheme = "basic"
            return
        if scheme != "bearer" or not params.get("realm"):
            raise AuthError(
                f"{self.ref}: the registry refused access with an unusable challenge {header!r}"
            )
        scopes = set(scope.split()) | set(params.get("scope", "").split())
        token = self._fetch_token(params, " ".join(sorted(scopes)))
        with self._mu:
            self._scheme = "bearer"
            self._tokens[scope] = token

    def _realm(self, text: str) -> httpx.URL:
        """The token realm, if it is HTTPS (or HTTP, for a plain HTTP registry)."""
        try:
            realm = httpx.URL(text)
        except httpx.InvalidURL:
            realm = None
        allowed = ("https", "http") if self.origin[0] == "http" else ("https",)
        if realm is None or realm.scheme not in allowed or not realm.host:
            raise AuthError(
                f"{self.ref}: the registry names the token realm {text!r}; credentials go "
                f"only to an {' or '.join(a.upper() for a in allowed)} realm"
            )
        return realm

    def _fetch_token(self, params: Mapping[str, str], scope: str) -> str:
        realm = self._realm(params["realm"])
        service = params.get("service", "")
        auth = self._auth
        if auth is not None and (auth.identity_token or auth.password):
            form = {"service": service, "scope": scope, "client_id": "pyctrd-cache"}
            if auth.identity_token:
                form |= {"grant_type": "refresh_token", "refresh_token": auth.identity_token}
            else:
                form |= {
                    "grant_type": "password",
                    "username": auth.username,
                    "password": auth.password,
                }
            answer = self._token_call("POST", realm, data=form)
            if answer.status_code not in (404, 405) or auth.identity_token:
                return self._token_of(answer)
        query = {k: v for k, v in (("service", service), ("scope", scope)) if v}
        basic = None
        if auth is not None and auth.username:
            basic = httpx.BasicAuth(auth.username, auth.password)
        return self._token_of(self._token_call("GET", realm, params=query, auth=basic))

    def _token_call(self, method: str, realm: httpx.URL, **kwargs: Any) -> _Answer:
        auth = kwargs.pop("auth", None)
        response = self._retrying(
            f"the token server ({method} {realm})",
            lambda: self._http.send(
                self._http.build_request(method, realm, **kwargs), auth=auth, stream=True
            ),
        )
        with contextlib.closing(response):
            return _Answer(response, self.read(response, MAX_TOKEN_ANSWER), MAX_TOKEN_ANSWER)

    def _token_of(self, answer: _Answer) -> str:
        if answer.status_code in (401, 403):
            raise AuthError(f"{self.ref}: the token server refused access ({self._who()})")
        if answer.status_code != 200:
            raise AuthError(f"{self.ref}: the token server answered HTTP {answer.status_code}")
        if answer.body is None:
            raise AuthError(
                f"{self.ref}: the token server's answer is larger than {MAX_TOKEN_ANSWER} bytes"
            )
        try:
            document = json.loads(answer.body)
        except ValueError:
            document = None
        token = (
            document.get("token") or document.get("access_token")
            if isinstance(document, dict)
            else None
        )
        if not isinstance(token, str) or not token:
            raise AuthError(f"{self.ref}: the token server's answer has no token")
        return token


class _Raw(io.RawIOBase):
    """The raw (still encoded) body of a streamed response as a file: pieces as the network
    gives them, the deadline checked after every one."""

    def __init__(self, response: httpx.Response, ref: Reference, deadline: float) -> None:
        super().__init__()
        self._pieces = response.iter_raw()
        self._url = response.url
        self._ref = ref
        self._deadline = deadline
        self._pending = b""
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if not self._pending:
            try:
                self._pending = next(self._pieces, b"")
            except httpx.HTTPError as err:
                raise UnavailableError(
                    f"{self._ref}: reading {self._url} failed after {self.count} bytes: {err}"
                ) from err
            if time.monotonic() > self._deadline:
                raise UnavailableError(
                    f"{self._ref}: reading {self._url} took too long ({self.count} bytes "
                    "arrived before the deadline; see the HTTP timeout)"
                )
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        self.count += n
        return n


class _Decoded(io.RawIOBase):
    """A decoder's output read in bounded steps; a malformed encoding is an
    `InvalidError`."""

    def __init__(self, read: Callable[[int], bytes], what: str) -> None:
        super().__init__()
        self._read = read
        self._what = what

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        try:
            data = self._read(len(buffer))
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as err:
            raise InvalidError(f"{self._what} is not validly encoded: {err}") from None
        buffer[: len(data)] = data
        return len(data)


def _decoded(response: httpx.Response, ref: Reference, deadline: float) -> BinaryIO:
    """The response's body, decoded by its `Content-Encoding` (none, gzip or zstd) in
    bounded steps, so a compression bomb costs no more memory than the bytes read."""
    raw = io.BufferedReader(_Raw(response, ref, deadline), _CHUNK)
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    what = f"{ref}: the body of {response.url}"
    read: Callable[[int], bytes]
    if encoding in ("", "identity"):
        return raw
    if encoding in ("gzip", "x-gzip"):
        read = gzip.GzipFile(fileobj=raw, mode="rb").read
    elif encoding == "zstd":
        read = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True).read
    else:
        raise InvalidError(f"{what} has the unsupported Content-Encoding {encoding!r}")
    return io.BufferedReader(_Decoded(read, what), _CHUNK)


def _error_text(answer: _Answer) -> str:
    """The registry's error codes and messages, else the status."""
    if answer.body is None:
        return f"HTTP {answer.status_code} (an error body over {answer.limit} bytes, not read)"
    with contextlib.suppress(ValueError, AttributeError):
        errors = json.loads(answer.body).get("errors")
        if isinstance(errors, list) and errors:
            return "; ".join(
                f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
                for e in errors
                if isinstance(e, Mapping)
            )
    return f"HTTP {answer.status_code}"


def _failure(answer: _Answer, what: str) -> CacheError:
    """The error for an unexpected answer to `what`."""
    text = f"{what}: {_error_text(answer)}"
    if answer.status_code == 404:
        return NotFoundError(text)
    if answer.status_code in (401, 403):
        return AuthError(text)
    if answer.status_code in (400, 405, 413, 416):
        return InvalidError(text)
    return CacheError(text)


# Reading.


def _as_credentials(auth: Credentials | tuple[str, str] | None) -> Credentials | None:
    if auth is None or isinstance(auth, Credentials):
        return auth
    return Credentials(*auth)


@dataclass(frozen=True)
class _TLS:
    """How to reach a registry: plain HTTP (`insecure` on loopback, `plain_http` anywhere),
    else HTTPS verified against the system's trust store and `ca_file`."""

    insecure: bool = False
    plain_http: bool = False
    ca_file: str | None = None

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if self.ca_file is not None:
            try:
                context.load_verify_locations(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as err:
                raise InvalidError(f"cannot use the CA file {self.ca_file}: {err}") from None
        return context


def _tls(insecure: bool, plain_http: bool, ca_file: str | os.PathLike[str] | None) -> _TLS:
    return _TLS(insecure, plain_http, os.fspath(ca_file) if ca_file is not None else None)


class RegistryProvider:
    """Serves the blobs of an image in an OCI distribution registry
    (`GET /v2/<name>/blobs/<digest>`, following redirects), streamed.

    `auth` is a `Credentials` or a (user name, password) pair; without it, the credentials
    files and helpers are asked (`pyctrd_cache.credentials`). `insecure` allows plain HTTP on
    loopback hosts, `plain_http` on any host; `ca_file` adds certificate authorities to the
    system's. `timeout` is the seconds an answer's body may take once its headers arrived
    (default `$PYCTRD_CACHE_HTTP_TIMEOUT`, else `DEFAULT_TIMEOUT`); a blob gets its size at
    `MIN_THROUGHPUT` more. A stream that ends early, breaks or misses its deadline raises a
    `CacheError` naming the reference; the content store's commit rejects bytes that do not
    match the digest.
    """

    def __init__(
        self,
        reference: str | Reference,
        *,
        auth: Credentials | tuple[str, str] | None = None,
        insecure: bool = False,
        plain_http: bool = False,
        ca_file: str | os.PathLike[str] | None = None,
        timeout: float | None = None,
    ) -> None:
        self.reference = (
            reference if isinstance(reference, Reference) else parse_reference(reference)
        )
        self._session = _Session(
            self.reference, _as_credentials(auth), _tls(insecure, plain_http, ca_file), timeout
        )

    def close(self) -> None:
        """Closes the connections (also done when the provider is collected)."""
        self._session.close()

    def __enter__(self) -> RegistryProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pull_scope(self) -> list[str]:
        return [f"repository:{self.reference.repository}:pull"]

    def open(self, desc: Descriptor) -> BinaryIO:
        """Streams the blob from the registry, following redirects; `NotFoundError` on a 404."""
        session = self._session
        url = session.url(self.reference.repository, "blobs", desc.digest)
        response = session.stream("GET", url, scopes=self._pull_scope(), follow_redirects=True)
        if response.status_code != 200:
            with contextlib.closing(response):
                answer = _Answer(response, session.read(response, MAX_ERROR_BODY), MAX_ERROR_BODY)
            raise _failure(answer, f"{self.reference}: blob {desc.digest}")
        body = _decoded(response, self.reference, session.deadline(desc.size))
        return io.BufferedReader(_BlobStream(response, body, desc, self.reference), _CHUNK)

    def check_blob(self, desc: Descriptor) -> None:
        """`NotFoundError` unless the registry has the blob (of the descriptor's size)."""
        url = self._session.url(self.reference.repository, "blobs", desc.digest)
        response = self._session.request(
            "HEAD", url, scopes=self._pull_scope(), follow_redirects=True
        )
        if response.status_code == 404:
            raise NotFoundError(f"layer blob {desc.digest} is not in {self.reference}")
        if response.status_code != 200:
            raise _failure(response, f"{self.reference}: blob {desc.digest}")
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) != desc.size:
            raise InvalidError(
                f"layer blob {desc.digest} in {self.reference} has {length} bytes, not {desc.size}"
            )

    def read_json_blob(self, desc: Descriptor) -> dict[str, Any]:
        """A config blob, checked against its descriptor."""
        if desc.size > MAX_JSON:
            raise InvalidError(f"blob {desc.digest} in {self.reference} is too large")
        with self.open(desc) as stream:
            data = stream.read(MAX_JSON + 1)
        return parse_json_blob(desc, data, str(self.reference))

    def manifest(self, name: str | None = None) -> tuple[Descriptor, dict[str, Any]]:
        """The manifest or index that the reference (or `name`, a tag or digest) names, and
        its descriptor; `NotFoundError` for an unknown repository, tag or digest."""
        ref = self.reference
        wanted = name or ref.tag_or_digest
        url = self._session.url(ref.repository, "manifests", wanted)
        response = self._session.request(
            "GET", url, scopes=self._pull_scope(), headers={"Accept": _ACCEPT}, limit=MAX_MANIFEST
        )
        if response.status_code == 404:
            raise NotFoundError(f"{ref}: no manifest {wanted} ({_error_text(response)})")
        if response.status_code != 200:
            raise _failure(response, f"{ref}: manifest {wanted}")
        data = response.body
        if data is None:
            raise InvalidError(f"{ref}: the manifest {wanted} is larger than {MAX_MANIFEST} bytes")
        expected = wanted if ":" in wanted else response.headers.get("Docker-Content-Digest", "")
        algorithm = parse_digest(expected).partition(":")[0] if expected else "sha256"
        digest = f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
        if expected and digest != expected:
            raise InvalidError(f"{ref}: the manifest {wanted} does not match its digest {expected}")
        media_type = response.headers.get("Content-Type", "").partition(";")[0].strip()
        if media_type not in (*MANIFESTS, *INDEXES):
            with contextlib.suppress(ValueError, AttributeError):
                media_type = str(json.loads(data).get("mediaType") or media_type)
        if media_type not in (*MANIFESTS, *INDEXES):
            raise InvalidError(f"{ref}: unsupported manifest media type {media_type!r}")
        desc = Descriptor(media_type, digest, len(data))
        return desc, parse_json_blob(desc, data, str(ref))


class _BlobStream(io.RawIOBase):
    """The decoded body of a blob response; a break, a missed deadline, or an end before
    the descriptor's size, is a `CacheError` naming the reference."""

    def __init__(
        self, response: httpx.Response, body: BinaryIO, desc: Descriptor, ref: Reference
    ) -> None:
        super().__init__()
        self._response = response
        self._body = body
        self._desc = desc
        self._ref = ref
        self._count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        try:
            data = self._body.read(min(len(buffer), _CHUNK))
        except CacheError as err:
            raise type(err)(f"blob {self._desc.digest}: {err}") from err
        if not data and self._count < self._desc.size:
            raise CacheError(
                f"{self._ref}: blob {self._desc.digest} ended after {self._count} of "
                f"{self._desc.size} bytes"
            )
        buffer[: len(data)] = data
        self._count += len(data)
        return len(data)

    def close(self) -> None:
        self._response.close()
        super().close()


def pull(
    cm: Manager,
    reference: str,
    *,
    auth: Credentials | tuple[str, str] | None = None,
    insecure: bool = False,
    plain_http: bool = False,
    ca_file: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    extract: bool = False,
    progress: ProgressCallback | None = None,
) -> ImmutableRef:
    """Registers the layers of the image `reference` names as (lazy) records with
    `get_by_blob` and a `RegistryProvider` handler; returns a ref on the top layer (release
    it).

    The manifest is resolved by tag (default `latest`) or digest; an index is followed to
    this machine's platform. Every layer blob is checked to be in the registry before any
    record is made, and the reference is recorded as the records' image ref (a later push
    to the same host mounts from that repository). With `extract` the chain is pulled and
    unpacked; on error, the records this call made are removed. `timeout` is as for
    `RegistryProvider`.
    """
    ref = parse_reference(reference)
    if ref.tag is None and ref.digest is None:
        ref = Reference(ref.host, ref.repository, "latest")
    provider = RegistryProvider(
        ref, auth=auth, insecure=insecure, plain_http=plain_http, ca_file=ca_file, timeout=timeout
    )
    where = str(ref)
    top, document = provider.manifest()

    def read_manifest(desc: Descriptor) -> dict[str, Any]:
        if desc.digest == top.digest:
            return document
        found, child = provider.manifest(desc.digest)
        if found.media_type != desc.media_type:
            raise InvalidError(
                f"{where}: {desc.digest} is a {found.media_type}, but the index says "
                f"{desc.media_type}"
            )
        return child

    manifest_desc, manifest = resolve_manifest(top, read_manifest, where)
    layers = layer_descriptors(
        manifest_desc,
        manifest,
        read_config=provider.read_json_blob,
        check_blob=provider.check_blob,
        where=where,
    )
    return register_layers(
        cm, layers, provider, where, extract=extract, progress=progress, where=where, registry=True
    )


# Pushing.


def push(
    ref: ImmutableRef,
    target: str,
    *,
    compression: Compression = Compression.GZIP,
    force_compression: bool = False,
    auth: Credentials | tuple[str, str] | None = None,
    insecure: bool = False,
    plain_http: bool = False,
    ca_file: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    chunk_size: int | None = None,
    progress: ProgressCallback | None = None,
) -> Descriptor:
    """Pushes the record's chain as an image to `target` (`host/repository[:tag]`, tag
    `latest` by default); returns the manifest's descriptor.

    The layers are `ref.get_remote(compression=..., force_compression=...)`; the config's
    `rootfs.diff_ids` are their uncompressed digests. A blob the registry has (`HEAD`) is
    skipped; one whose `containerd.io/distribution.source.<host>` annotation names another
    repository on the target's host is mounted from there when the registry allows it;
    others are uploaded whole, or in `chunk_size` pieces (`PATCH`), three at a time. The first
    upload that fails stops the others (those waiting never start, those running stop at their
    next piece) and is the error raised. The manifest goes last.
    `progress` hears `start`, `bytes` and `end` for every layer blob. `timeout` is as for
    `RegistryProvider`.
    """
    target_ref = parse_reference(target)
    if target_ref.digest is not None:
        raise InvalidError(f"{target}: push to a tag, not a digest")
    if chunk_size is not None and chunk_size <= 0:
        raise InvalidError(f"chunk size {chunk_size} is not positive")
    if target_ref.tag is None:
        target_ref = Reference(target_ref.host, target_ref.repository, "latest")
    remote = ref.get_remote(compression=compression, force_compression=force_compression)
    image = image_of(ref, remote)
    session = _Session(
        target_ref, _as_credentials(auth), _tls(insecure, plain_http, ca_file), timeout
    )
    try:
        uploads = TaskGroup(_PARALLEL_UPLOADS, name="pyctrd-cache-push")
        uploader = _Uploader(session, target_ref, chunk_size, progress, uploads.checkpoint)

        def upload(desc: Descriptor) -> None:
            uploader.blob(desc, lambda: remote.provider.open(desc), _sources(desc, target_ref))

        with unwrapped(), uploads:
            for d in remote.descriptors:
                uploads.start(functools.partial(upload, d))
        uploader.blob(image.config_desc, lambda: io.BytesIO(image.config), [], notify=False)
        desc = image.manifest_desc
        response = session.request(
            "PUT",
            session.url(target_ref.repository, "manifests", target_ref.tag_or_digest),
            scopes=uploader.scopes,
            headers={"Content-Type": desc.media_type},
            body=image.manifest,
        )
        if response.status_code != 201:
            raise _failure(response, f"{target_ref}: pushing the manifest {desc.digest}")
    finally:
        session.close()
    return desc


_PARALLEL_UPLOADS: Final = 3


def _sources(desc: Descriptor, target: Reference) -> list[str]:
    """The repositories on the target's host that the blob came from (its
    `containerd.io/distribution.source.<host>` annotation), the target's own excepted."""
    value = desc.annotations.get(DISTRIBUTION_SOURCE_PREFIX + target.hostname, "")
    return [r for r in value.split(",") if r and r != target.repository]


class _Uploader:
    """Uploads blobs to one repository."""

    def __init__(
        self,
        session: _Session,
        target: Reference,
        chunk_size: int | None,
        progress: ProgressCallback | None,
        checkpoint: Callable[[], None],
    ) -> None:
        self.session = session
        self.target = target
        self.chunk_size = chunk_size
        self.progress = progress
        # Called between the pieces of a blob: raises to stop an upload whose push failed.
        self.checkpoint = checkpoint
        self.scopes = [f"repository:{target.repository}:pull,push"]

    def _notify(self, event: ProgressEvent, notify: bool) -> None:
        if notify and self.progress is not None:
            self.progress(event)

    def blob(
        self,
        desc: Descriptor,
        open_blob: Callable[[], BinaryIO],
        sources: list[str],
        *,
        notify: bool = True,
    ) -> None:
        self._notify(ProgressEvent("start", desc.digest, 0, desc.size), notify)
        try:
            self._blob(desc, open_blob, sources, notify)
        except BaseException as err:
            self._notify(ProgressEvent("end", desc.digest, 0, desc.size, error=err), notify)
            raise
        self._notify(ProgressEvent("end", desc.digest, desc.size, desc.size), notify)

    def _blob(
        self, desc: Descriptor, open_blob: Callable[[], BinaryIO], sources: list[str], notify: bool
    ) -> None:
        session, repository = self.session, self.target.repository
        what = f"{self.target}: uploading blob {desc.digest}"
        head = session.request(
            "HEAD", session.url(repository, "blobs", desc.digest), scopes=self.scopes
        )
        if head.status_code == 200:
            return
        uploads = session.url(repository, "blobs/uploads")
        location = None
        for source in sources:
            with contextlib.suppress(AuthError):
                mounted = session.request(
                    "POST",
                    uploads,
                    scopes=[*self.scopes, f"repository:{source}:pull"],
                    params={"mount": desc.digest, "from": source},
                )
                if mounted.status_code == 201:
                    return
                if mounted.status_code == 202:
                    location = _location(mounted, what)
                    break
        if location is None:
            started = session.request("POST", uploads, scopes=self.scopes)
            if started.status_code != 202:
                raise _failure(started, what)
            location = _location(started, what)
        body: Body
        if self.chunk_size is not None and desc.size > self.chunk_size:
            location = self._chunks(desc, open_blob, location, what, notify)
            body, length = b"", 0
        else:

            def body() -> Iterator[bytes]:
                yield from self._read(desc, open_blob, notify)

            length = desc.size
        done = session.request(
            "PUT",
            str(httpx.URL(location).copy_merge_params({"digest": desc.digest})),
            scopes=self.scopes,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(length)},
            body=body,
        )
        if done.status_code != 201:
            raise _failure(done, what)

    def _read(
        self, desc: Descriptor, open_blob: Callable[[], BinaryIO], notify: bool
    ) -> Iterator[bytes]:
        count = 0
        with open_blob() as stream:
            while chunk := stream.read(_CHUNK):
                self.checkpoint()
                count += len(chunk)
                if count > desc.size:
                    raise CacheError(f"blob {desc.digest} is larger than its size {desc.size}")
                self._notify(ProgressEvent("bytes", desc.digest, count, desc.size), notify)
                yield chunk
        if count != desc.size:
            raise CacheError(f"blob {desc.digest} has {count} bytes, not {desc.size}")

    def _chunks(
        self,
        desc: Descriptor,
        open_blob: Callable[[], BinaryIO],
        location: str,
        what: str,
        notify: bool,
    ) -> str:
        """Sends the blob in `PATCH`es of `chunk_size` bytes; returns the last location."""
        assert self.chunk_size is not None
        offset = 0
        piece = bytearray()
        for chunk in self._read(desc, open_blob, notify):
            piece += chunk
            while len(piece) >= self.chunk_size or (piece and offset + len(piece) == desc.size):
                self.checkpoint()
                part = bytes(piece[: self.chunk_size])
                del piece[: self.chunk_size]
                answer = self.session.request(
                    "PATCH",
                    location,
                    scopes=self.scopes,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{offset + len(part) - 1}",
                    },
                    body=part,
                )
                if answer.status_code != 202:
                    raise _failure(answer, what)
                location = _location(answer, what)
                offset += len(part)
        return location


def _location(response: _Answer, what: str) -> str:
    location = response.headers.get("Location")
    if not location:
        raise CacheError(f"{what}: the registry's answer has no Location")
    return str(response.url.join(location))
