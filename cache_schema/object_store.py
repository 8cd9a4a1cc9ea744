"""Stores behind object-storage URLs (``s3://``, ``gs://``...): failures as one-line errors.

s3fs and botocore fail with their own exceptions (``NoCredentialsError``, ``ProfileNotFound``,
``ClientError``, ``EndpointConnectionError``; s3fs turns some into ``PermissionError`` or
``FileNotFoundError`` with the botocore error as cause). They are recognised here by class name
along the cause chain, so this module needs neither botocore nor s3fs installed. zarr reads a
missing bucket as an empty location, so :func:`missing_bucket` asks the filesystem directly.
"""

from __future__ import annotations

from cache_schema.errors import ConfigError

# URL schemes whose first path component is a bucket (container) that must exist beforehand.
BUCKET_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "ProfileNotFound", "CredentialRetrievalError",
                "NoAuthTokenError", "UnauthorizedSSOTokenError", "SSOTokenLoadError", "InvalidConfigError"}
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                 "AllAccessDisabled", "403"}
_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ProxyConnectionError",
                "ClientConnectorError", "ServerDisconnectedError"}
_HOW_CREDENTIALS = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE to a profile in ~/.aws/config"


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (s3fs keeps botocore's error as the cause)."""
    out: list[BaseException] = []
    while exc is not None and exc not in out and len(out) < 8:
        out.append(exc)
        exc = exc.__cause__  # not __context__: an error raised while handling another is not it
    return out


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ``ClientError`` (``None`` for anything else)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code")
    return None


def _bucket(location: str) -> tuple[str, str] | None:
    """``(scheme, bucket)`` of a URL with a bucket scheme, else ``None``."""
    scheme, sep, rest = location.partition("://")
    if not sep or scheme.lower() not in BUCKET_SCHEMES:
        return None
    name = rest.split("/", 1)[0]
    return (scheme.lower(), name) if name else None


def object_store_error(location: str | None, exc: BaseException) -> ConfigError | None:
    """A one-line ConfigError saying what is wrong and how to fix it, when ``exc`` is a failure
    of the object store's credentials, permissions, bucket or endpoint; else ``None``.

    ``location``: the store URL, named in the message (``None`` when unknown)."""
    where = f" {location}" if location else " the store"
    for e in _chain(exc):
        names, code = _names(e), _error_code(e)
        detail = " ".join(str(e).split()) or type(e).__name__
        if names & _CREDENTIALS:
            return ConfigError(f"no usable credentials to open{where} ({detail}); {_HOW_CREDENTIALS}")
        if code in _DENIED_CODES:
            return ConfigError(f"access to{where} was denied ({detail}); check the credentials ({_HOW_CREDENTIALS}) "
                               "and that they may read and write the bucket")
        if code == "NoSuchBucket":
            bucket = _bucket(location) if location else None
            return ConfigError(_no_bucket_message(location, *bucket) if bucket else
                               f"the bucket of{where} does not exist ({detail}); create it first or fix the URL")
        if names & _UNREACHABLE:
            return ConfigError(f"cannot reach the object store of{where} ({detail}); check the network and the "
                               "endpoint (AWS_ENDPOINT_URL_S3 for S3-compatible servers)")
    return None


def _no_bucket_message(location: str | None, scheme: str, bucket: str) -> str:
    make = f"aws s3 mb s3://{bucket}" if scheme in ("s3", "s3a") else f"your provider's tools, for {scheme}://{bucket}"
    return f"bucket {bucket!r} of {location} does not exist; create bucket {bucket} first ({make}) or fix the URL"


def _filesystem(location: str):
    """The fsspec filesystem of ``location`` and the path within it, with its listing cache dropped
    (a cached listing would hide objects written or deleted by another process)."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(location)
    fs.invalidate_cache(path)
    return fs, path


def missing_bucket(location: str) -> ConfigError | None:
    """A ConfigError naming the bucket when ``location``'s bucket does not exist, else ``None``.

    Why needed: zarr treats every "no such key" as an empty location, so a misspelt bucket would
    otherwise read as "no store here" and a new store as a bucket error deep inside zarr."""
    bucket = _bucket(location)
    if bucket is None:
        return None
    try:
        fs, _ = _filesystem(location)
        fs.ls(bucket[1], detail=False)
    except FileNotFoundError:
        return ConfigError(_no_bucket_message(location, *bucket))
    except Exception as exc:  # noqa: BLE001 - credentials/permissions/endpoint: say that instead
        return object_store_error(location, exc)
    return None


def has_objects(location: str) -> bool:
    """Whether anything is stored under ``location`` (a URL); failures as :func:`object_store_error`."""
    try:
        fs, path = _filesystem(location)
        return bool(fs.ls(path, detail=False))
    except FileNotFoundError:
        return False
    except Exception as exc:
        problem = object_store_error(location, exc)
        if problem is None:
            raise
        raise problem from None
