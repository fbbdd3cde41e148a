"""A real, throwaway Kubernetes control plane for tests.

``KubeControlPlane`` starts etcd, kube-apiserver and (optionally)
kube-controller-manager as plain processes on 127.0.0.1, built by
``scripts/k8s-binaries.sh`` from the Go module proxy and cached under
``~/.cache/kubellm/bin``. There is no kubelet: Pods are stored but never run.

    with KubeControlPlane() as kube:
        kube.kubectl("create", "namespace", "x")
        token = kube.create_service_account_token("router", "x")

Everything (certificates, tokens, etcd data, logs, kubeconfigs) lives in one
temporary directory that is removed on exit.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import ipaddress
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "k8s-binaries.sh"

ADMIN_USER = "kubellm-admin"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"  # allocation range only; nothing is routed there
_KCM_USER = "system:kube-controller-manager"


class KubeError(RuntimeError):
    """The control plane could not be built, started or used."""


class KubectlError(subprocess.CalledProcessError):
    """A kubectl/helm call failed; ``str()`` includes its stderr."""

    def __str__(self) -> str:
        cmd = self.cmd if isinstance(self.cmd, str) else shlex.join(str(c) for c in self.cmd)
        return f"{cmd!r} exited {self.returncode}:\n{self.stderr or ''}{self.stdout or ''}"


# --------------------------------------------------------------------------- binaries


@dataclass(frozen=True)
class KubeBinaries:
    """Where the cached control-plane binaries are."""

    k8s_dir: Path
    etcd_dir: Path
    helm_dir: Path

    @property
    def kube_apiserver(self) -> Path:
        return self.k8s_dir / "kube-apiserver"

    @property
    def kube_controller_manager(self) -> Path:
        return self.k8s_dir / "kube-controller-manager"

    @property
    def kubectl(self) -> Path:
        return self.k8s_dir / "kubectl"

    @property
    def etcd(self) -> Path:
        return self.etcd_dir / "etcd"

    @property
    def helm(self) -> Path:
        return self.helm_dir / "helm"

    @property
    def path_entries(self) -> list[str]:
        return [str(self.k8s_dir), str(self.etcd_dir), str(self.helm_dir)]

    def all_present(self) -> bool:
        bins = (self.kube_apiserver, self.kube_controller_manager, self.kubectl, self.etcd, self.helm)
        return all(os.access(b, os.X_OK) for b in bins)


def _parse_exports(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("export "):
            continue
        name, _, value = line[len("export ") :].partition("=")
        parts = shlex.split(value) if value else [""]
        out[name] = parts[0] if parts else ""
    return out


def ensure_binaries(*, timeout: float = 3600.0) -> KubeBinaries:
    """Locate (building on first use) kube-apiserver, kube-controller-manager, kubectl, etcd, helm.

    If ``KUBELLM_K8S_BIN``, ``KUBELLM_ETCD_BIN`` and ``KUBELLM_HELM_BIN`` are set
    (e.g. by ``eval "$(scripts/k8s-binaries.sh)"`` in CI) they are used as is;
    otherwise the build script runs (a no-op taking milliseconds once cached).
    """
    env_dirs = [os.environ.get(n) for n in ("KUBELLM_K8S_BIN", "KUBELLM_ETCD_BIN", "KUBELLM_HELM_BIN")]
    if all(env_dirs):
        bins = KubeBinaries(*(Path(d) for d in env_dirs if d))
        if bins.all_present():
            return bins
    if not BUILD_SCRIPT.is_file():
        raise KubeError(f"build script not found: {BUILD_SCRIPT}")
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        stdout=subprocess.PIPE,
        stderr=None,  # build progress goes straight to the terminal / pytest capture
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise KubeError(f"{BUILD_SCRIPT} failed with exit code {proc.returncode}")
    exports = _parse_exports(proc.stdout)
    try:
        bins = KubeBinaries(
            Path(exports["KUBELLM_K8S_BIN"]),
            Path(exports["KUBELLM_ETCD_BIN"]),
            Path(exports["KUBELLM_HELM_BIN"]),
        )
    except KeyError as exc:
        raise KubeError(f"{BUILD_SCRIPT} printed no {exc.args[0]}: {proc.stdout!r}") from None
    if not bins.all_present():
        raise KubeError(f"{BUILD_SCRIPT} reported binaries that do not exist: {bins}")
    return bins


# --------------------------------------------------------------------------- PKI


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@dataclass(frozen=True)
class _Pki:
    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    sa_key: Path
    sa_pub: Path


def _make_pki(directory: Path) -> _Pki:
    directory.mkdir(parents=True, exist_ok=True)
    not_before = _now() - dt.timedelta(minutes=5)
    not_after = _now() + dt.timedelta(days=2)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubellm-test-ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    srv_key = ec.generate_private_key(ec.SECP256R1())
    first_service_ip = next(ipaddress.IPv4Network(SERVICE_CLUSTER_IP_RANGE).hosts())
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.DNSName("kubernetes"),
        x509.DNSName("kubernetes.default"),
        x509.DNSName("kubernetes.default.svc"),
        x509.DNSName("kubernetes.default.svc.cluster.local"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(first_service_ip),
    ]
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    pki = _Pki(
        ca_cert=directory / "ca.crt",
        ca_key=directory / "ca.key",
        serving_cert=directory / "apiserver.crt",
        serving_key=directory / "apiserver.key",
        sa_key=directory / "sa.key",
        sa_pub=directory / "sa.pub",
    )
    _write_cert(pki.ca_cert, ca_cert)
    _write_key(pki.ca_key, ca_key)
    _write_cert(pki.serving_cert, srv_cert)
    _write_key(pki.serving_key, srv_key)
    _write_key(pki.sa_key, sa_key)
    pki.sa_pub.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pki


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    """A currently unused TCP port on 127.0.0.1 (racy by nature; callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_setup() -> Callable[[], None] | None:
    """Have children die with us on Linux (only from the main thread: PDEATHSIG is per thread)."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    pr_set_pdeathsig = 1

    def setup() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)

    return setup


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait(timeout=grace)
        self.log_file.close()


# --------------------------------------------------------------------------- control plane


@dataclass(frozen=True)
class StaticTokenUser:
    """A user authenticated by a static bearer token (``--token-auth-file``)."""

    name: str
    groups: tuple[str, ...] = ()
    token: str = field(default_factory=lambda: secrets.token_hex(24))
    uid: str = ""


class KubeControlPlane:
    """etcd + kube-apiserver (+ kube-controller-manager) on 127.0.0.1, as a context manager.

    Attributes available once started: ``server_url``, ``token`` (admin, group
    ``system:masters``), ``ca_path``, ``kubeconfig_path``, ``workdir``, ``binaries``.
    """

    def __init__(
        self,
        *,
        controller_manager: bool = True,
        controllers: Sequence[str] = (
            "garbage-collector-controller",
            "namespace-controller",
            "serviceaccount-controller",
            "serviceaccount-token-controller",
            "clusterrole-aggregation-controller",
        ),
        users: Sequence[StaticTokenUser] = (),
        apiserver_args: Sequence[str] = (),
        startup_timeout: float = 180.0,
        binaries: KubeBinaries | None = None,
        keep_workdir: bool = False,
    ) -> None:
        self._want_kcm = controller_manager
        self._controllers = tuple(controllers)
        self._extra_apiserver_args = tuple(apiserver_args)
        self._startup_timeout = startup_timeout
        self._keep_workdir = keep_workdir
        self._binaries = binaries
        self.token = secrets.token_hex(24)
        self._kcm_token = secrets.token_hex(24)
        self.users: dict[str, StaticTokenUser] = {}
        for u in users:
            if u.name in (ADMIN_USER, _KCM_USER) or u.name in self.users:
                raise ValueError(f"duplicate static user {u.name!r}")
            self.users[u.name] = u
        self._procs: list[_Proc] = []
        self._workdir: Path | None = None
        self._server_url: str | None = None
        self._etcd_url: str | None = None
        self._pki: _Pki | None = None
        self._kubeconfig: Path | None = None
        self._ssl: ssl.SSLContext | None = None

    # ---- properties -----------------------------------------------------------

    def _require(self, value: Any, what: str) -> Any:
        if value is None:
            raise KubeError(f"control plane not started ({what} unavailable)")
        return value

    @property
    def workdir(self) -> Path:
        return Path(self._require(self._workdir, "workdir"))

    @property
    def server_url(self) -> str:
        return str(self._require(self._server_url, "server_url"))

    @property
    def etcd_url(self) -> str:
        return str(self._require(self._etcd_url, "etcd_url"))

    @property
    def ca_path(self) -> Path:
        pki: _Pki = self._require(self._pki, "ca_path")
        return pki.ca_cert

    @property
    def service_account_signing_key(self) -> Path:
        """The PEM private key the API server signs ServiceAccount tokens with (its issuer is
        ``server_url``): lets a test mint tokens the API server cannot (an expired one)."""
        pki: _Pki = self._require(self._pki, "service_account_signing_key")
        return pki.sa_key

    @property
    def kubeconfig_path(self) -> Path:
        return Path(self._require(self._kubeconfig, "kubeconfig_path"))

    @property
    def binaries(self) -> KubeBinaries:
        bins: KubeBinaries = self._require(self._binaries, "binaries")
        return bins

    # ---- lifecycle ------------------------------------------------------------

    def __enter__(self) -> KubeControlPlane:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self._workdir is not None:
            raise KubeError("control plane already started")
        if self._binaries is None:
            self._binaries = ensure_binaries()
        self._workdir = Path(tempfile.mkdtemp(prefix="kubellm-kube-"))
        try:
            self._pki = _make_pki(self._workdir / "pki")
            self._ssl = ssl.create_default_context(cafile=str(self._pki.ca_cert))
            self._start_with_retries(self._start_etcd)
            self._start_with_retries(self._start_apiserver)
            self._kubeconfig = self.write_kubeconfig(
                self.token, self._workdir / "kubeconfig", user=ADMIN_USER
            )
            if self._want_kcm:
                self._start_controller_manager()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for proc in reversed(self._procs):
            with contextlib.suppress(Exception):
                proc.stop()
        self._procs.clear()
        if self._workdir is not None and not self._keep_workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
        self._workdir = None
        self._server_url = None
        self._etcd_url = None
        self._kubeconfig = None

    def _start_with_retries(self, starter: Callable[[], None], attempts: int = 3) -> None:
        for attempt in range(1, attempts + 1):
            try:
                starter()
                return
            except _PortRace:
                if attempt == attempts:
                    raise KubeError("could not find free ports after retries") from None

    def _spawn(self, name: str, args: Sequence[str], env: Mapping[str, str] | None = None) -> _Proc:
        log_path = self.workdir / "logs" / f"{name}.log"
        log_path.parent.mkdir(exist_ok=True)
        log_file = log_path.open("ab")
        popen = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=str(self.workdir),
            env=dict(env) if env is not None else None,
            preexec_fn=_child_setup(),
        )
        proc = _Proc(name, popen, log_path, log_file)
        self._procs.append(proc)
        return proc

    def _wait(self, proc: _Proc, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                tail = proc.log_tail()
                self._procs.remove(proc)
                proc.stop()
                if "address already in use" in tail:
                    raise _PortRace(tail)
                raise KubeError(f"{proc.name} exited with {proc.popen.returncode} before {what}:\n{tail}")
            if ready():
                return
            time.sleep(0.2)
        raise KubeError(f"timed out after {self._startup_timeout}s waiting for {what}:\n{proc.log_tail()}")

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        client_url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
        data_dir = self.workdir / "etcd-data"
        shutil.rmtree(data_dir, ignore_errors=True)
        proc = self._spawn(
            "etcd",
            [
                str(self.binaries.etcd),
                "--name=kubellm-test",
                f"--data-dir={data_dir}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=kubellm-test={peer_url}",
                "--initial-cluster-state=new",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{client_url}/health", timeout=2) as resp:
                    body: dict[str, Any] = json.loads(resp.read())
                    return str(body.get("health")) == "true"
            except (OSError, ValueError):
                return False

        self._wait(proc, ready, "etcd /health")
        self._etcd_url = client_url

    def _start_apiserver(self) -> None:
        pki: _Pki = self._require(self._pki, "pki")
        port = free_port()
        server_url = f"https://127.0.0.1:{port}"
        token_file = self.workdir / "tokens.csv"
        rows: list[tuple[str, str, str, tuple[str, ...]]] = [
            (self.token, ADMIN_USER, ADMIN_USER, ("system:masters",))
        ]
        rows.append((self._kcm_token, _KCM_USER, _KCM_USER, ("system:masters",)))
        rows += [(u.token, u.name, u.uid or u.name, u.groups) for u in self.users.values()]
        with token_file.open("w") as f:
            for tok, name, uid, groups in rows:
                f.write(f'{tok},{name},{uid},"{",".join(groups)}"\n')
        token_file.chmod(0o600)
        args = [
            str(self.binaries.kube_apiserver),
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={pki.serving_cert}",
            f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca_cert}",
            f"--token-auth-file={token_file}",
            "--authorization-mode=RBAC",
            "--anonymous-auth=false",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            f"--service-account-issuer={server_url}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
        ]
        if not self._want_kcm:
            # Without the serviceaccount controller no "default" ServiceAccount appears.
            args.append("--disable-admission-plugins=ServiceAccount")
        args += self._extra_apiserver_args
        proc = self._spawn("kube-apiserver", args)
        self._server_url = server_url

        def ready() -> bool:
            status, _ = self.request("GET", "/readyz", timeout=3)
            return status == 200

        try:
            self._wait(proc, ready, "kube-apiserver /readyz")
        except BaseException:
            self._server_url = None
            raise

    def _start_controller_manager(self) -> None:
        pki: _Pki = self._require(self._pki, "pki")
        kubeconfig = self.write_kubeconfig(
            self._kcm_token, self.workdir / "kube-controller-manager.kubeconfig", user=_KCM_USER
        )
        proc = self._spawn(
            "kube-controller-manager",
            [
                str(self.binaries.kube_controller_manager),
                f"--kubeconfig={kubeconfig}",
                f"--controllers={','.join(self._controllers)}",
                "--leader-elect=false",
                "--secure-port=0",
                f"--cert-dir={self.workdir / 'kcm-certs'}",
                f"--service-account-private-key-file={pki.sa_key}",
                f"--root-ca-file={pki.ca_cert}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--concurrent-gc-syncs=5",
                "--v=1",
            ],
        )
        if {"serviceaccount", "serviceaccount-controller"} & set(self._controllers):
            # The serviceaccount controller creates "default" in every namespace:
            # a cheap signal that the controllers are running.
            def ready() -> bool:
                status, _ = self.request(
                    "GET", "/api/v1/namespaces/default/serviceaccounts/default", timeout=3
                )
                return status == 200

            self._wait(proc, ready, "kube-controller-manager (default ServiceAccount)")
        if {"clusterroleaggregation", "clusterrole-aggregation-controller"} & set(self._controllers):
            # admin/edit/view are aggregated ClusterRoles: empty until this controller fills them.
            def aggregated() -> bool:
                status, body = self.request(
                    "GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles/view", timeout=3
                )
                return status == 200 and bool(body.get("rules"))

            self._wait(proc, aggregated, "kube-controller-manager (aggregated 'view' ClusterRole)")

    # ---- clients --------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        """A raw API request; returns (HTTP status, decoded JSON or text). Never raises on HTTP errors."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server_url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {token or self.token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._ssl) as resp:
                return int(resp.status), _decode(resp.read())
        except urllib.error.HTTPError as err:
            return int(err.code), _decode(err.read())
        except OSError:
            return 0, None

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for kubectl/helm/other clients: KUBECONFIG and PATH with the cached binaries."""
        env = dict(os.environ if base is None else base)
        env["KUBECONFIG"] = str(self.kubeconfig_path)
        env["PATH"] = os.pathsep.join([*self.binaries.path_entries, env.get("PATH", "")])
        helm_home = self.workdir / "helm"
        env.setdefault("HELM_CACHE_HOME", str(helm_home / "cache"))
        env.setdefault("HELM_CONFIG_HOME", str(helm_home / "config"))
        env.setdefault("HELM_DATA_HOME", str(helm_home / "data"))
        return env

    def _run(
        self,
        argv: Sequence[str],
        *,
        check: bool,
        input: str | None,
        timeout: float,
        kubeconfig: Path | None,
    ) -> subprocess.CompletedProcess[str]:
        env = self.env()
        if kubeconfig is not None:
            env["KUBECONFIG"] = str(kubeconfig)
        proc = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, list(argv), proc.stdout, proc.stderr)
        return proc

    def kubectl(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 60.0,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster (admin unless ``kubeconfig`` is given)."""
        kc = kubeconfig or self.kubeconfig_path
        return self._run(
            [str(self.binaries.kubectl), f"--kubeconfig={kc}", *args],
            check=check,
            input=input,
            timeout=timeout,
            kubeconfig=kc,
        )

    def apply(
        self, manifest: str | Mapping[str, Any], *, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``kubectl apply -f -`` of a YAML/JSON string or a dict."""
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        return self.kubectl("apply", "-f", "-", input=text, check=check)

    def helm(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 300.0,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run helm against this cluster with its config/cache inside the temp dir."""
        kc = kubeconfig or self.kubeconfig_path
        return self._run(
            [str(self.binaries.helm), f"--kubeconfig={kc}", *args],
            check=check,
            input=None,
            timeout=timeout,
            kubeconfig=kc,
        )

    # ---- identities -----------------------------------------------------------

    def write_kubeconfig(self, token: str, path: Path | None = None, *, user: str = "user") -> Path:
        """Write a self-contained kubeconfig (CA embedded) authenticating with ``token``."""
        if path is None:
            path = self.workdir / "kubeconfigs" / f"{_safe(user)}-{secrets.token_hex(4)}.kubeconfig"
        path.parent.mkdir(parents=True, exist_ok=True)
        ca_b64 = base64.b64encode(self.ca_path.read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "kubellm-test",
                    "cluster": {"server": self.server_url, "certificate-authority-data": ca_b64},
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "kubellm-test", "context": {"cluster": "kubellm-test", "user": user}}],
            "current-context": "kubellm-test",
        }
        path.write_text(json.dumps(config, indent=2))  # JSON is valid YAML for every client
        path.chmod(0o600)
        return path

    def user(self, name: str) -> StaticTokenUser:
        """A static-token user passed to the constructor."""
        return self.users[name]

    def user_kubeconfig(self, name: str) -> Path:
        """Kubeconfig for a static-token user passed to the constructor."""
        u = self.users[name]
        return self.write_kubeconfig(u.token, user=u.name)

    def create_service_account_token(
        self,
        name: str,
        namespace: str = "default",
        *,
        duration: str = "1h",
        audiences: Sequence[str] = (),
    ) -> str:
        """Create the ServiceAccount if missing and return a bound token (TokenRequest API)."""
        if self.kubectl("get", "serviceaccount", name, "-n", namespace, check=False).returncode != 0:
            self.kubectl("create", "serviceaccount", name, "-n", namespace)
        args = ["create", "token", name, "-n", namespace, f"--duration={duration}"]
        args += [f"--audience={a}" for a in audiences]
        return self.kubectl(*args).stdout.strip()

    def service_account_kubeconfig(
        self, name: str, namespace: str = "default", *, duration: str = "1h"
    ) -> Path:
        token = self.create_service_account_token(name, namespace, duration=duration)
        return self.write_kubeconfig(token, user=f"system:serviceaccount:{namespace}:{name}")

    # ---- waiting --------------------------------------------------------------

    def wait_until(
        self, predicate: Callable[[], bool], *, timeout: float = 30.0, interval: float = 0.2
    ) -> None:
        """Poll ``predicate`` until true, raising TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"condition not met within {timeout}s")
            time.sleep(interval)

    def logs(self) -> dict[str, str]:
        """Current log text of each component (for debugging failures)."""
        out: dict[str, str] = {}
        for p in self._procs:
            with contextlib.suppress(OSError):
                out[p.name] = p.log_path.read_text(errors="replace")
        return out

    def iter_processes(self) -> Iterator[tuple[str, int]]:
        for p in self._procs:
            yield p.name, p.popen.pid


class _PortRace(Exception):
    pass


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
