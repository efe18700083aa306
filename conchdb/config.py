"""Every `CONCHDB_*` setting, read from the environment in one place.

Commands build one `Settings()` at start-up and pass the values down as plain
arguments, so library code never reads the environment itself and tests can
construct settings explicitly.
"""

from __future__ import annotations

from pathlib import Path

import platformdirs
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from conchdb.catalog import TILES_COLLECTION


def default_home() -> Path:
    return Path(platformdirs.user_data_dir("conchdb", appauthor=False))


class Settings(BaseSettings):
    """conchdb configuration; each field is the env var `CONCHDB_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="CONCHDB_", extra="ignore")

    home: Path = Field(default_factory=default_home, description="data folder (models, store, caches)")
    checkpoint: str | None = Field(None, description="CONCH weights: a file path or hf_hub:MahmoodLab/conch")
    tokenizer: Path | None = Field(None, description="CONCH tokenizer JSON file")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    precision: str = Field("auto", description="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16")
    store: Path | None = Field(None, description="embedded Qdrant store folder (default $CONCHDB_HOME/store)")
    qdrant_url: str | None = Field(None, description="Qdrant server URL; when set, the server backend is used")
    qdrant_api_key: str | None = Field(None, description="API key for the Qdrant server")
    copy_qdrant_api_key: str | None = Field(
        None, description="API key of the Qdrant server that `conchdb copy` writes to (default: qdrant_api_key)"
    )
    collection: str = Field(TILES_COLLECTION, description="tiles collection name")
    api_key: str | None = Field(None, description="API key that `conchdb serve` requires of every request")
    admin_key: str | None = Field(
        None, description="Key that `conchdb serve` requires to delete slides over HTTP (none: no deletes)"
    )
    qdrant_shards: int | None = Field(None, description="shards of a collection created on a Qdrant cluster")
    qdrant_replicas: int | None = Field(None, description="copies of each shard on a Qdrant cluster")
    broker_url: str | None = Field(
        None, description="Redis URL of the broker for distributed ingest (redis://:PASSWORD@HOST:6379/0)"
    )
    queue: str = Field("conchdb", description="broker queue that workers take slides from")
    visibility_timeout: int = Field(
        21600, description="seconds a slide may take before the broker hands it to another worker"
    )
    dicomweb_token: SecretStr | None = Field(None, description="bearer token for DICOMweb servers (never logged)")
    dicomweb_user: str | None = Field(None, description="user name for basic auth on DICOMweb servers")
    dicomweb_password: SecretStr | None = Field(None, description="password for basic auth on DICOMweb servers")
    dicomweb_ca_bundle: Path | None = Field(
        None, description="CA bundle (PEM) to verify DICOMweb servers' TLS certificates with (default: the system's)"
    )
    dicomweb_timeout: float = Field(10.0, description="seconds to wait for a DICOMweb server to connect or answer")
    dicomweb_requests: int = Field(8, description="DICOMweb frame requests in flight per tile reader process")
    max_deliveries: int = Field(
        3, description="deliveries of one slide (a worker died on it each time) before it is recorded failed"
    )
    worker_lost_s: float = Field(
        30.0, gt=0,
        description="seconds without a heartbeat (workers beat every 5 s) after which a worker is lost and "
        "the slides it held are sent again",
    )

    @property
    def models_dir(self) -> Path:
        return self.home / "models" / "conch"

    @property
    def store_path(self) -> Path:
        return self.store if self.store is not None else self.home / "store"
