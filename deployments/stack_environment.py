"""What each process of the stack may inherit from the shell that started it: an allow-list per
server (the basics, its own settings, never a credential or key) and one for the workers (the
project's, Prefect's, Dask's and AWS's settings, the numeric and GPU libraries', TLS trust and
proxies), and loopback kept away from a site's proxy."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["SERVERS", "loopback_unproxied", "server_environment", "worker_environment"]

# What a server the stack starts may inherit: the process basics and its own settings. The Prefect
# server, the S3 server, the Dask scheduler and Orthanc read no model, image or bucket, so they get no
# AWS or PACS credentials, signing or de-identification key; the workers, which do, get them.
_BASICS = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV",
           "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")
_SERVER_SETTINGS = {"server": ("PREFECT_",), "s3": ("MOTO_",), "postgres": (), "orthanc": (),
                    # It unpickles references to the project's modules, which read Prefect's settings on import.
                    "dask-scheduler": ("PREFECT_", "DASK_")}
# The Prefect server checks PREFECT_SERVER_API_AUTH_STRING; no server needs a client's credentials.
_NEVER_TO_SERVERS = ("PREFECT_API_KEY", "PREFECT_API_AUTH_STRING")


# What the workers (and the deploy step) may inherit besides the basics: the project's, Prefect's, Dask's
# and AWS's settings, the numeric and GPU libraries', TLS trust and proxies; not whatever else the
# shell that ran 'stack up' holds (other services' tokens), and never a database URL (its password).
_WORKER_SETTINGS = ("CXR_", "PREFECT_", "DASK_", "AWS_", "PYTHON", "TF_", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "CUDA_",
                    "NVIDIA_", "XLA_", "KERAS_", "OPENVINO_", "MPLCONFIGDIR", "LD_LIBRARY_PATH", "SSL_CERT_",
                    "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy",
                    "https_proxy", "no_proxy")


def worker_environment(environment: Mapping[str, str]) -> dict[str, str]:
    """The variables of ``environment`` the stack's workers may inherit (an allow-list)."""
    return {key: value for key, value in environment.items()
            if (key in _BASICS or key.startswith(("LC_", *_WORKER_SETTINGS))) and "DATABASE" not in key}


def server_environment(name: str, environment: dict[str, str]) -> dict[str, str]:
    """The variables of ``environment`` the server ``name`` needs (an allow-list): the basics, the
    locale's LC_* and its own settings; never a credential or key."""
    prefixes = _SERVER_SETTINGS[name]
    return {key: value for key, value in environment.items()
            if (key in _BASICS or key.startswith(("LC_", *prefixes))) and key not in _NEVER_TO_SERVERS
            and not (name != "server" and "DATABASE" in key)}  # a database URL holds its password


def loopback_unproxied(shell: Mapping[str, str]) -> dict[str, str]:
    """NO_PROXY and no_proxy with the stack's loopback added, where the shell names a proxy: the
    workers' calls to the stack's API, S3 and PACS carry its credentials, which a site's proxy would
    see in clear (and could not forward to this machine's loopback anyway)."""
    if not any(shell.get(name) for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")):
        return {}
    listed = [item.strip() for name in ("NO_PROXY", "no_proxy") for item in shell.get(name, "").split(",") if item.strip()]
    value = ",".join(dict.fromkeys([*listed, "127.0.0.1", "localhost"]))
    return {"NO_PROXY": value, "no_proxy": value}


SERVERS = frozenset(_SERVER_SETTINGS)  # what the stack starts as a server (its files private, umask 077)
