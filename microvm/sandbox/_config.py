"""``SandboxConfig``: every argument of ``Sandbox.create`` validated, before anything starts.

Validation is pure (no image pull, no boot, no network objects): a bad value raises
:class:`~microvm.errors.SandboxConfigError` naming it and what is allowed, and a bad
policy raises ``netstack.PolicyError`` unchanged. The config round-trips through JSON
(:meth:`SandboxConfig.to_json` / :meth:`SandboxConfig.from_json`) for the state
database and the supervisor; **secret values are never part of it** (only each secret's
env name, placeholder and hosts): they travel to the supervisor through a pipe.

Example::

    >>> cfg = SandboxConfig.build("web", image="local/busybox:1", ports={8080: 80},
    ...                           volumes={"/data": {"named": "cache"}}, network="public_only")
    >>> cfg.ports[0].host_port, cfg.volumes[0].named
    (8080, 'cache')
    >>> SandboxConfig.from_json(cfg.to_json()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from microvm.errors import SandboxConfigError

if TYPE_CHECKING:  # imported where used: the supervisor starts the VMM before loading them
    from netstack import NetworkPolicy
    from tls_proxy import Secret

__all__ = [
    "DnsOptions",
    "PortMapping",
    "SandboxConfig",
    "SecretSpec",
    "TlsOptions",
    "Volume",
    "parse_duration",
    "parse_secrets",
    "validate_name",
]

PullPolicy = Literal["always", "if-missing", "never"]
LogLevel = Literal["error", "warn", "info", "debug", "trace"]
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_VOLUME_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
#: guest paths a volume may not be mounted on (or under, for the first group): it would
#: shadow the system the guest needs to run
_SHADOW_TREE = ("/proc", "/sys", "/dev", "/.microvm")
_SHADOW_EXACT = ("/", "/bin", "/sbin", "/usr", "/lib", "/lib64", "/lib32", "/etc", "/boot",
                 "/run", "/var", "/usr/bin", "/usr/sbin", "/usr/lib", "/usr/lib64",
                 "/usr/local", "/usr/local/bin", "/usr/share")
_PULL = ("always", "if-missing", "never")
_LEVELS = ("error", "warn", "info", "debug", "trace")
_MAX_VOLUMES = 8


def validate_name(name: object) -> str:
    """A sandbox name: 1-63 of ``[A-Za-z0-9_.-]``, starting with a letter or digit.

    Example::

        >>> validate_name("web-1")
        'web-1'
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SandboxConfigError(
            f"bad sandbox name {name!r}: use 1-63 letters, digits, '_', '.', '-', "
            f"starting with a letter or digit")
    return name


def parse_duration(value: object, what: str) -> float | None:
    """Seconds as an int/float, or a string like ``"90"``, ``"30s"``, ``"5m"``, ``"2h"``.

    Example::

        >>> parse_duration("5m", "max_duration"), parse_duration(None, "x")
        (300.0, None)
    """
    if value is None:
        return None
    seconds: float
    if isinstance(value, bool):
        raise SandboxConfigError(f"bad {what} {value!r}: give seconds (> 0) or '30s'/'5m'/'2h'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", value)
        if not m:
            raise SandboxConfigError(
                f"bad {what} {value!r}: give seconds (> 0) or '30s'/'5m'/'2h'")
        seconds = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    else:
        raise SandboxConfigError(f"bad {what} {value!r}: give seconds (> 0) or '30s'/'5m'/'2h'")
    if not seconds > 0 or seconds > 365 * 86400:
        raise SandboxConfigError(f"bad {what} {value!r}: must be > 0 and at most a year")
    return seconds


@dataclass(frozen=True)
class PortMapping:
    """A published port: ``127.0.0.1:host_port`` on the host -> ``guest_port`` in the guest.

    Example::

        >>> PortMapping.parse("8080:80/udp")
        PortMapping(host_port=8080, guest_port=80, protocol='udp')
    """

    host_port: int
    guest_port: int
    protocol: Literal["tcp", "udp"] = "tcp"

    def __post_init__(self) -> None:
        for what, port, low in (("host", self.host_port, 0), ("guest", self.guest_port, 1)):
            if isinstance(port, bool) or not isinstance(port, int) or not low <= port <= 65535:
                raise SandboxConfigError(f"bad {what} port {port!r}: must be an int in {low}..65535")
        if self.protocol not in ("tcp", "udp"):
            raise SandboxConfigError(f"bad port protocol {self.protocol!r}: use 'tcp' or 'udp'")

    @classmethod
    def parse(cls, value: object) -> PortMapping:
        """From ``"HOST:GUEST[/udp]"``, ``(host, guest)`` or a ``PortMapping``.

        Example::

            >>> PortMapping.parse((8080, 80)).guest_port
            80
        """
        if isinstance(value, PortMapping):
            return value
        if isinstance(value, tuple) and len(value) == 2:
            return cls(value[0], value[1])
        if isinstance(value, str):
            spec, _, proto = value.partition("/")
            host, sep, guest = spec.rpartition(":")
            if sep and host.isdigit() and guest.isdigit() and proto in ("", "tcp", "udp"):
                return cls(int(host), int(guest), "udp" if proto == "udp" else "tcp")
        raise SandboxConfigError(
            f"bad port mapping {value!r}: use 'HOST:GUEST' or 'HOST:GUEST/udp' (e.g. '8080:80')")

    def to_str(self) -> str:
        """The ``HOST:GUEST[/udp]`` form.

        Example::

            >>> PortMapping(8080, 80).to_str()
            '8080:80'
        """
        return f"{self.host_port}:{self.guest_port}" + ("/udp" if self.protocol == "udp" else "")


@dataclass(frozen=True)
class Volume:
    """A virtio-fs mount at ``guest_path``: a host directory, or a named volume.

    Named volumes live in ``$MICROVM_HOME/volumes/<name>`` and survive the sandbox.

    Example::

        >>> Volume.parse("/data", {"host": "/tmp", "readonly": True}).readonly
        True
        >>> Volume.parse("/cache", {"named": "pip"}).named
        'pip'
    """

    guest_path: str
    host: str | None = None
    named: str | None = None
    readonly: bool = False

    @classmethod
    def parse(cls, guest_path: object, spec: object) -> Volume:
        """Validate one ``volumes=`` entry (guest path -> host dir | {host|named, readonly}).

        Example::

            >>> Volume.parse("/data", "/tmp").host
            '/tmp'
        """
        if not isinstance(guest_path, str) or not guest_path.startswith("/") \
                or "\0" in guest_path or len(guest_path) > 1024:
            raise SandboxConfigError(f"bad volume guest path {guest_path!r}: must be absolute")
        parts = [p for p in guest_path.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise SandboxConfigError(
                f"bad volume guest path {guest_path!r}: '.' and '..' are not allowed")
        norm = "/" + "/".join(parts)
        if norm in _SHADOW_EXACT or any(norm == t or norm.startswith(t + "/")
                                        for t in _SHADOW_TREE):
            raise SandboxConfigError(
                f"volume guest path {guest_path!r} would shadow the system the guest needs "
                f"(refused: / /proc /sys /dev /bin /sbin /usr /lib /etc /run /var ...); "
                f"mount it below a path of its own such as /data or /mnt/x")
        host: object = None
        named: object = None
        readonly: object = False
        if isinstance(spec, str | os.PathLike):
            host = os.fspath(spec)
        elif isinstance(spec, Mapping):
            unknown = set(spec) - {"host", "named", "readonly"}
            if unknown:
                raise SandboxConfigError(
                    f"volume {norm}: unknown keys {sorted(unknown)} (allowed: host, named, "
                    f"readonly)")
            host, named, readonly = spec.get("host"), spec.get("named"), spec.get("readonly", False)
            if isinstance(host, os.PathLike):
                host = os.fspath(host)
        else:
            raise SandboxConfigError(
                f"volume {norm}: give a host directory or {{'host': DIR, 'readonly': bool}} or "
                f"{{'named': NAME}}, got {spec!r}")
        if (host is None) == (named is None):
            raise SandboxConfigError(f"volume {norm}: give exactly one of 'host' or 'named'")
        if not isinstance(readonly, bool):
            raise SandboxConfigError(f"volume {norm}: readonly must be a bool, got {readonly!r}")
        if host is not None:
            if not isinstance(host, str) or not host:
                raise SandboxConfigError(f"volume {norm}: host must be a directory path")
            hp = Path(host).expanduser()
            if not hp.is_dir():
                raise SandboxConfigError(
                    f"volume {norm}: host directory {host!r} does not exist or is not a directory")
            return cls(norm, host=str(hp.resolve()), readonly=readonly)
        if not isinstance(named, str) or not _VOLUME_NAME_RE.match(named):
            raise SandboxConfigError(
                f"volume {norm}: bad volume name {named!r}: use letters, digits, '_', '.', '-'")
        return cls(norm, named=named, readonly=readonly)


@dataclass(frozen=True)
class SecretSpec:
    """What may be stored of a secret: env name, placeholder, allowed hosts (never the value).

    Example::

        >>> from tls_proxy import Secret
        >>> SecretSpec.of(Secret("TOKEN", "v", ["api.example.com"])).placeholder
        '$MSB_TOKEN'
    """

    env: str
    placeholder: str
    hosts: tuple[str, ...]
    inject: tuple[str, ...]

    @classmethod
    def of(cls, secret: Secret) -> SecretSpec:
        """The storable part of a :class:`tls_proxy.Secret`.

        Example::

            >>> from tls_proxy import Secret
            >>> SecretSpec.of(Secret("T", "v", "a.example")).hosts
            ('a.example',)
        """
        return cls(secret.env, secret.placeholder, tuple(str(h) for h in secret.hosts),
                   secret.inject)


def parse_secrets(secrets: object) -> list[Secret]:
    """``secrets=``: ``tls_proxy.Secret`` objects or ``{"env", "value", "host"|"hosts"}`` dicts.

    A dict may also carry ``placeholder`` and ``inject``. Errors name the env, never the
    value.

    Example::

        >>> [s.env for s in parse_secrets([{"env": "K", "value": "v", "host": "a.example"}])]
        ['K']
    """
    if secrets is None:
        return []
    from tls_proxy import Secret
    from tls_proxy.errors import TlsProxyError

    if isinstance(secrets, Secret | Mapping | str | bytes):
        raise SandboxConfigError("secrets must be a list of tls_proxy.Secret or dicts")
    out: list[Secret] = []
    if not isinstance(secrets, Iterable):
        raise SandboxConfigError("secrets must be a list of tls_proxy.Secret or dicts")
    item: object
    for i, item in enumerate(secrets):
        if isinstance(item, Secret):
            out.append(item)
            continue
        if not isinstance(item, Mapping):
            raise SandboxConfigError(
                f"secrets[{i}] must be a tls_proxy.Secret or a dict with env, value, host(s)")
        unknown = set(item) - {"env", "value", "host", "hosts", "placeholder", "inject"}
        if unknown:
            raise SandboxConfigError(
                f"secrets[{i}] ({item.get('env')!r}): unknown keys {sorted(unknown)} "
                f"(allowed: env, value, host, hosts, placeholder, inject)")
        if ("host" in item) == ("hosts" in item):
            raise SandboxConfigError(
                f"secrets[{i}] ({item.get('env')!r}): give exactly one of 'host' or 'hosts'")
        hosts = item["host"] if "host" in item else item["hosts"]
        try:
            kwargs: dict[str, Any] = {}
            if "inject" in item:
                kwargs["inject"] = tuple(item["inject"])
            out.append(Secret(item.get("env"), item.get("value"), hosts,  # type: ignore[arg-type]
                              placeholder=item.get("placeholder"), **kwargs))
        except (TlsProxyError, TypeError) as e:
            raise SandboxConfigError(f"secrets[{i}]: {e}") from None
    envs = [s.env for s in out]
    dup = sorted({e for e in envs if envs.count(e) > 1})
    if dup:
        raise SandboxConfigError(f"secret env names given twice: {dup}")
    return out


@dataclass(frozen=True)
class DnsOptions:
    """The sandbox's DNS forwarder: upstream ``nameservers`` (default: the host's
    resolv.conf), ``rebind_protection`` (answers in private/reserved ranges become
    NXDOMAIN; default on) and the per-query ``timeout`` in seconds.

    Example::

        >>> DnsOptions(nameservers=("192.0.2.53",)).rebind_protection
        True
    """

    nameservers: tuple[str, ...] = ()
    rebind_protection: bool = True
    timeout: float = 3.0

    def __post_init__(self) -> None:
        if isinstance(self.nameservers, str) or not all(
                isinstance(n, str) and n for n in self.nameservers):
            raise SandboxConfigError(
                f"dns nameservers must be a list of IP addresses, got {self.nameservers!r}")
        if not isinstance(self.rebind_protection, bool):
            raise SandboxConfigError("dns rebind_protection must be a bool")
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, int | float) \
                or not 0 < self.timeout <= 60:
            raise SandboxConfigError(f"dns timeout must be in (0, 60] seconds, got {self.timeout!r}")


@dataclass(frozen=True)
class TlsOptions:
    """TLS interception settings (interception itself switches on with ``secrets``).

    ``upstream_ca_certs``: extra PEM files the proxy trusts for upstream servers;
    ``bypass``: hosts spliced without interception (no substitution for them);
    ``ports``: intercepted TCP ports.

    Example::

        >>> TlsOptions(bypass=("*.bank.example",)).ports
        (443,)
        >>> TlsOptions(upstream_ca_certs=("/no/such-ca.pem",))   # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        microvm.errors.SandboxConfigError: tls upstream CA file '/no/such-ca.pem' does not exist
    """

    upstream_ca_certs: tuple[str, ...] = ()
    bypass: tuple[str, ...] = ()
    ports: tuple[int, ...] = (443,)

    def __post_init__(self) -> None:
        for p in self.upstream_ca_certs:
            if not isinstance(p, str) or not Path(p).is_file():
                raise SandboxConfigError(f"tls upstream CA file {p!r} does not exist")
        if isinstance(self.bypass, str) or not all(isinstance(b, str) and b for b in self.bypass):
            raise SandboxConfigError(f"tls bypass must be a list of host patterns, got {self.bypass!r}")
        if not self.ports or not all(isinstance(p, int) and not isinstance(p, bool)
                                     and 1 <= p <= 65535 and p != 53 for p in self.ports):
            raise SandboxConfigError(f"tls ports must be 1..65535 (not 53), got {self.ports!r}")


def _str_map(value: object, what: str, key_re: re.Pattern[str] | None = None) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SandboxConfigError(f"{what} must be a dict of str -> str, got {type(value).__name__}")
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k or "\0" in k or (key_re and not key_re.match(k)):
            raise SandboxConfigError(f"bad {what} key {k!r}")
        if not isinstance(v, str) or "\0" in v:
            raise SandboxConfigError(f"{what}[{k!r}] must be a str without NUL, got {v!r}")
        out[k] = v
    return out


def _str_list(value: object, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Sequence) or not all(isinstance(v, str) and "\0" not in v
                                                  for v in value):
        raise SandboxConfigError(f"{what} must be a str or a list of str, got {value!r}")
    return tuple(value)


def _abs_path(value: object, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise SandboxConfigError(f"{what} must be an absolute guest path, got {value!r}")
    return value


@dataclass(frozen=True)
class SandboxConfig:
    """The validated, storable configuration of one sandbox (see :meth:`build`).

    ``image`` is the reference or local directory as given (``image_kind`` says which);
    ``network`` is the policy's wire form (``None`` = no NIC at all).

    Example::

        >>> SandboxConfig.build("a", image="/", network="none").network is None
        True
    """

    name: str
    image: str
    image_kind: Literal["ref", "dir", "object"] = "ref"
    cpus: int = 1
    memory: int = 512
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    shell: str = "/bin/sh"
    user: str | None = None
    hostname: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    scripts: dict[str, str] = field(default_factory=dict)
    ports: tuple[PortMapping, ...] = ()
    volumes: tuple[Volume, ...] = ()
    network: dict[str, Any] | None = None
    secrets: tuple[SecretSpec, ...] = ()
    pull_policy: PullPolicy = "if-missing"
    registry_insecure: bool = False
    registry_ca_certs: tuple[str, ...] = ()
    upper_size_mib: int = 4096
    max_duration: float | None = None
    idle_timeout: float | None = None
    rlimits: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)
    log_level: LogLevel = "info"
    detached: bool = False
    backend: str = "qemu"
    dns: DnsOptions = field(default_factory=DnsOptions)
    tls: TlsOptions = field(default_factory=TlsOptions)
    pcap: str | None = None

    @classmethod
    def build(
        cls,
        name: str,
        *,
        image: str,
        image_kind: Literal["ref", "dir", "object"] | None = None,
        cpus: int = 1,
        memory: int = 512,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        shell: str | None = None,
        user: str | None = None,
        hostname: str | None = None,
        labels: Mapping[str, str] | None = None,
        entrypoint: str | Sequence[str] | None = None,
        cmd: str | Sequence[str] | None = None,
        scripts: Mapping[str, str] | None = None,
        ports: Mapping[int, int] | Iterable[str | tuple[int, int] | PortMapping] | None = None,
        volumes: Mapping[str, Any] | None = None,
        network: object = None,
        secrets: Sequence[Secret] = (),
        pull_policy: str = "if-missing",
        registry_insecure: bool = False,
        registry_ca_certs: str | Sequence[str] | None = None,
        upper_size_mib: int = 4096,
        max_duration: float | str | None = None,
        idle_timeout: float | str | None = None,
        rlimits: Mapping[str, int | tuple[int | None, int | None] | None] | None = None,
        log_level: str = "info",
        detached: bool = False,
        backend: str = "qemu",
        dns: DnsOptions | None = None,
        tls: TlsOptions | None = None,
        pcap: str | os.PathLike[str] | None = None,
    ) -> SandboxConfig:
        """Validate everything and build the config (raises before any slow work).

        Example::

            >>> SandboxConfig.build("w", image="busybox", cpus=2, memory=256).cpus
            2
        """
        validate_name(name)
        if not isinstance(image, str) or not image:
            raise SandboxConfigError(f"image must be a reference, a directory or a rootfs.Image, "
                                     f"got {image!r}")
        kind = image_kind or ("dir" if image.startswith(("/", "./", "../", "~")) else "ref")
        for what, val, low, high in (("cpus", cpus, 1, 64), ("memory", memory, 64, 65536),
                                     ("upper_size_mib", upper_size_mib, 8, 1 << 24)):
            if isinstance(val, bool) or not isinstance(val, int) or not low <= val <= high:
                raise SandboxConfigError(f"bad {what} {val!r}: must be an int in {low}..{high}"
                                         + (" (MiB)" if what != "cpus" else ""))
        if pull_policy not in _PULL:
            raise SandboxConfigError(f"bad pull_policy {pull_policy!r}: use one of {', '.join(_PULL)}")
        if log_level not in _LEVELS:
            raise SandboxConfigError(f"bad log_level {log_level!r}: use one of {', '.join(_LEVELS)}")
        for what, flag in (("registry_insecure", registry_insecure), ("detached", detached)):
            if not isinstance(flag, bool):
                raise SandboxConfigError(f"{what} must be a bool, got {flag!r}")
        if not isinstance(backend, str) or backend not in ("qemu", "libkrun"):
            raise SandboxConfigError(f"bad backend {backend!r}: use 'qemu' or 'libkrun' "
                                     f"(or pass a Backend object)")
        if hostname is not None and (not isinstance(hostname, str) or not re.fullmatch(
                r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", hostname)):
            raise SandboxConfigError(f"bad hostname {hostname!r}: letters, digits and '-' (1-63)")
        if user is not None and (not isinstance(user, str | int) or isinstance(user, bool)
                                 or user == ""):
            raise SandboxConfigError(f"bad user {user!r}: a name, uid or 'uid:gid'")
        scripts_map = _str_map(scripts, "scripts", re.compile(r"^[A-Za-z0-9_.-]{1,64}$"))
        port_list: list[PortMapping] = []
        if ports is not None:
            if isinstance(ports, str | bytes):
                raise SandboxConfigError(f"ports must be a dict or a list of 'HOST:GUEST', "
                                         f"got the string {ports!r}")
            items = ports.items() if isinstance(ports, Mapping) else ports
            port_list = [PortMapping.parse(p) for p in items]
            seen = [(p.guest_port, p.protocol) for p in port_list]
            if len(set(seen)) != len(seen):
                raise SandboxConfigError(f"a guest port is published twice: {sorted(seen)}")
        vols: list[Volume] = []
        if volumes is not None:
            if not isinstance(volumes, Mapping):
                raise SandboxConfigError("volumes must be a dict {guest_path: host_dir | "
                                         "{'host'|'named': ..., 'readonly': bool}}")
            vols = [Volume.parse(g, s) for g, s in volumes.items()]
            paths = [v.guest_path for v in vols]
            if len(set(paths)) != len(paths):
                raise SandboxConfigError(f"two volumes on the same guest path: {sorted(paths)}")
            if len(vols) > _MAX_VOLUMES:
                raise SandboxConfigError(f"at most {_MAX_VOLUMES} volumes, got {len(vols)}")
        from netstack import NetworkPolicy

        policy = NetworkPolicy.coerce("public_only" if network is None
                                      else network)  # type: ignore[arg-type]
        no_nic = _is_none_policy(policy)
        if port_list and no_nic:
            raise SandboxConfigError("ports need a network: network='none' gives the guest no NIC")
        specs = tuple(SecretSpec.of(s) for s in secrets)
        if specs and no_nic:
            raise SandboxConfigError("secrets need a network to reach their hosts; "
                                     "network='none' gives the guest no NIC")
        for s in specs:
            _check_secret_hosts(s, policy)
        rl: dict[str, tuple[int | None, int | None]] = {}
        if rlimits:
            from microvm.agent import RLIMIT_NAMES

            for rname, lim in rlimits.items():
                if rname not in RLIMIT_NAMES:
                    raise SandboxConfigError(f"unknown rlimit {rname!r}; allowed: "
                                             f"{', '.join(sorted(RLIMIT_NAMES))}")
                soft, hard = lim if isinstance(lim, tuple) else (lim, lim)
                for lv in (soft, hard):
                    if lv is not None and (isinstance(lv, bool) or not isinstance(lv, int)
                                           or lv < 0):
                        raise SandboxConfigError(f"rlimit {rname}: limits must be ints >= 0 or "
                                                 f"None (unlimited), got {lim!r}")
                rl[rname] = (soft, hard)
        ca_list = _str_list(registry_ca_certs, "registry_ca_certs") or ()
        if pcap is not None and not Path(os.fspath(pcap)).parent.is_dir():
            raise SandboxConfigError(f"pcap {os.fspath(pcap)!r}: its directory does not exist")
        return cls(
            name=name, image=image, image_kind=kind, cpus=cpus, memory=memory,
            env=_str_map(env, "env", _ENV_RE),
            workdir=_abs_path(workdir, "workdir"),
            shell=_abs_path(shell, "shell") or "/bin/sh",
            user=None if user is None else str(user), hostname=hostname,
            labels=_str_map(labels, "labels"),
            entrypoint=_str_list(entrypoint, "entrypoint"), cmd=_str_list(cmd, "cmd"),
            scripts=scripts_map, ports=tuple(port_list), volumes=tuple(vols),
            network=None if no_nic else policy.to_dict(), secrets=specs,
            pull_policy=pull_policy,  # type: ignore[arg-type]
            registry_insecure=registry_insecure, registry_ca_certs=ca_list,
            upper_size_mib=upper_size_mib,
            max_duration=parse_duration(max_duration, "max_duration"),
            idle_timeout=parse_duration(idle_timeout, "idle_timeout"),
            rlimits=rl, log_level=log_level,  # type: ignore[arg-type]
            detached=detached, backend=backend,
            dns=dns or DnsOptions(), tls=tls or TlsOptions(),
            pcap=None if pcap is None else str(Path(os.fspath(pcap)).absolute()))

    def policy(self) -> NetworkPolicy:
        """The effective network policy (``none`` when the sandbox has no NIC).

        Example::

            >>> SandboxConfig.build("p", image="x").policy().to_dict()["default_egress"]
            'deny'
        """
        from netstack import NetworkPolicy

        if self.network is None:
            return NetworkPolicy.coerce("none")
        return NetworkPolicy.from_dict(self.network)

    def to_json(self) -> str:
        """JSON text (no secret values in it).

        Example::

            >>> '"name": "j"' in SandboxConfig.build("j", image="x").to_json()
            True
        """
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SandboxConfig:
        """Inverse of :meth:`to_json`.

        Example::

            >>> c = SandboxConfig.build("k", image="x")
            >>> SandboxConfig.from_json(c.to_json()).name
            'k'
        """
        d = json.loads(text)
        d["ports"] = tuple(PortMapping(**p) for p in d["ports"])
        d["volumes"] = tuple(Volume(**v) for v in d["volumes"])
        d["secrets"] = tuple(SecretSpec(s["env"], s["placeholder"], tuple(s["hosts"]),
                                        tuple(s["inject"])) for s in d["secrets"])
        d["dns"] = DnsOptions(tuple(d["dns"]["nameservers"]), d["dns"]["rebind_protection"],
                              d["dns"]["timeout"])
        d["tls"] = TlsOptions(tuple(d["tls"]["upstream_ca_certs"]), tuple(d["tls"]["bypass"]),
                              tuple(d["tls"]["ports"]))
        for key in ("entrypoint", "cmd"):
            if d[key] is not None:
                d[key] = tuple(d[key])
        d["registry_ca_certs"] = tuple(d["registry_ca_certs"])
        d["rlimits"] = {k: (v[0], v[1]) for k, v in d["rlimits"].items()}
        return cls(**d)


def _is_none_policy(policy: NetworkPolicy) -> bool:
    """True when the policy can never pass a packet either way: the guest gets no NIC."""
    d = policy.to_dict()
    return (d["default_egress"] == "deny" and d["default_ingress"] == "deny"
            and all(r["action"] == "deny" for r in d["rules"]))


def _check_secret_hosts(spec: SecretSpec, policy: NetworkPolicy) -> None:
    """Refuse a secret none of whose exact hosts the policy lets the guest resolve.

    A secret for a host the policy denies could never be used: that is a mistake in the
    call, so ``create`` refuses it (rather than warn) and names the host.
    """
    exact = [h for h in spec.hosts if h != "*" and not h.startswith("*.")]
    for h in exact:
        if policy.evaluate_dns(h).action == "allow":
            return
    if exact and len(exact) == len(spec.hosts):
        raise SandboxConfigError(
            f"secret {spec.env}: the network policy denies every host it is for "
            f"({', '.join(exact)}); allow the host or drop the secret")
