"""The `conchdb` app, its error handling, and the store and model options every command shares.

Commands stay thin: they parse options, call the package, and print. Errors a user can
cause arrive as `ConchdbError`; `handles_errors` prints the message and its fix, naming the
option the error is about (the library says `top_k`, the user typed `--top-k`), and exits
with the error's code (2 for bad input). Nothing the user did wrong ends in a traceback.

The store options (`--store`, `--qdrant-url`, `--collection`) and the model options
(`--checkpoint`, `--tokenizer`, `--device`, `--precision`) are declared once here;
`uses_options` adds them to a command and hands it one `Options` object, built with the
`CONCHDB_*` settings read once for the command.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console

from conchdb.errors import ConchdbError

if TYPE_CHECKING:
    from conchdb.config import Settings
    from conchdb.model.encoder import Encoder
    from conchdb.search import Searcher
    from conchdb.store import Store

app = typer.Typer(
    name="conchdb",
    help="A searchable vector database of tissue, built on CONCH and Qdrant.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

err_console = Console(stderr=True)
out_console = Console()

F = TypeVar("F", bound=Callable[..., Any])

ALIASES = {"path": ("file", "slide"), "k": ("top_k", "topk"), "labels": ("label",), "slide_id": ("slide",),
           "broker_url": ("broker",)}
"""Library parameter names whose command-line spelling differs, by the commands' own names."""


def current_command() -> Any:
    """The click command running now, or None outside a command.

    Typer ships its own copy of click (`typer._click`) in recent releases and plain click
    in older ones; the running command's context lives in whichever one built it."""
    import importlib

    for module in ("typer._click.globals", "click"):
        try:
            ctx = importlib.import_module(module).get_current_context(silent=True)
        except (ImportError, AttributeError):
            continue
        if ctx is not None:
            return ctx.command
    return None


def option_name(parameter: str, command: Any) -> str:
    """How the user spells a library parameter: the current command's option (`--top-k`) or
    argument (`QUERY`), else the parameter as a flag."""
    if command is not None:
        for name in (parameter, *ALIASES.get(parameter, ())):
            for param in getattr(command, "params", ()):
                if param.name == name:
                    if param.param_type_name == "option":
                        return max(param.opts, key=len)
                    return getattr(param, "human_readable_name", None) or param.metavar or param.name.upper()
    return "--" + parameter.replace("_", "-")


def report(exc: ConchdbError) -> None:
    """Print an error as `error: message` and `fix: --flag: what to do`."""
    flag = option_name(exc.parameter, current_command()) if exc.parameter else None
    err_console.print(f"[bold red]error:[/] {exc.message}", highlight=False, soft_wrap=True)
    if exc.fix or flag:
        fix = exc.fix or "check it"
        err_console.print(f"[bold]fix:[/] {flag + ': ' if flag else ''}{fix}", highlight=False, soft_wrap=True)


def handles_errors(fn: F) -> F:
    """Turn a `ConchdbError` into a printed message and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConchdbError as exc:
            report(exc)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def load_settings() -> Settings:
    """The `CONCHDB_*` settings; a command reads them once."""
    from conchdb.config import Settings

    return Settings()


def print_json(doc: Any) -> None:
    import json

    typer.echo(json.dumps(doc, default=str))


StoreOpt = Annotated[
    Path | None, typer.Option("--store", help="Embedded store folder (default: $CONCHDB_HOME/store).")
]
QdrantUrlOpt = Annotated[
    str | None, typer.Option("--qdrant-url", help="Use a Qdrant server or cluster at this URL instead.")
]
CollectionOpt = Annotated[str | None, typer.Option("--collection", help="Tiles collection (default: conch_tiles).")]
CheckpointOpt = Annotated[
    str | None, typer.Option("--checkpoint", help="CONCH weights: a path or hf_hub:MahmoodLab/conch.")
]
TokenizerOpt = Annotated[Path | None, typer.Option("--tokenizer", help="CONCH tokenizer JSON file.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
PrecisionOpt = Annotated[str | None, typer.Option("--precision", help="auto, fp32, bf16 or fp16.")]

STORE_OPTIONS = {"store": StoreOpt, "qdrant_url": QdrantUrlOpt}
COLLECTION_OPTIONS = {"collection": CollectionOpt}
MODEL_OPTIONS = {"checkpoint": CheckpointOpt, "tokenizer": TokenizerOpt, "device": DeviceOpt, "precision": PrecisionOpt}


@dataclass(frozen=True)
class Options:
    """The shared options of one command, over the settings read once for it."""

    settings: Settings
    store: Path | None = None
    qdrant_url: str | None = None
    collection: str | None = None
    checkpoint: str | None = None
    tokenizer: Path | None = None
    device: str | None = None
    precision: str | None = None

    @property
    def collection_name(self) -> str:
        return self.collection or self.settings.collection

    @property
    def cache_dir(self) -> Path:
        return self.settings.home / "cache"

    def open_store(self) -> Store:
        """The store the options name, else the one the settings name."""
        from conchdb.store import open_store

        return open_store(self.store or self.settings.store_path, self.server_url, self.settings.qdrant_api_key,
                          shard_number=self.settings.qdrant_shards, replication_factor=self.settings.qdrant_replicas)

    @property
    def server_url(self) -> str | None:
        """The Qdrant server the options name, else the settings' (None: the embedded store)."""
        if self.store is not None and self.qdrant_url is not None:
            raise ConchdbError(
                "--store and --qdrant-url both given", "choose the embedded store or a server, not both"
            )
        return self.qdrant_url or (None if self.store is not None else self.settings.qdrant_url)

    def load_encoder(
        self, towers: Iterable[str] = ("vision", "text"), need_tokenizer: bool = True, batch_size: int = 32
    ) -> Encoder:
        """An `Encoder` with `towers`, from the options, falling back to the settings."""
        from conchdb.model.encoder import Encoder

        return Encoder.load(
            self.checkpoint,
            self.tokenizer,
            self.device or self.settings.device,
            self.precision or self.settings.precision,
            env_checkpoint=self.settings.checkpoint,
            env_tokenizer=self.settings.tokenizer,
            models_dir=self.settings.models_dir,
            need_tokenizer=need_tokenizer,
            batch_size=batch_size,
            towers=towers,
            cache_dir=self.cache_dir,
        )

    def searcher(self, with_store: bool = True) -> Searcher:
        """A `Searcher` that opens the store and loads the model when a query first needs them."""
        from conchdb.search import Searcher

        return Searcher(
            collection=self.collection_name,
            cache_dir=self.cache_dir,
            load_encoder=lambda towers: self.load_encoder(towers),
            open_store=self.open_store if with_store else None,
        )


def uses_options(*, store: bool = False, collection: bool = False, model: bool = False) -> Callable[[F], F]:
    """Add the shared options to a command, which takes them as one `options: Options`.

    The options are appended to the command's own parameters; the settings are read once,
    when the command runs."""
    shared = {
        **(STORE_OPTIONS if store else {}),
        **(COLLECTION_OPTIONS if collection else {}),
        **(MODEL_OPTIONS if model else {}),
    }

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn, eval_str=True)
        own = [p for name, p in signature.parameters.items() if name != "options"]
        keyword = inspect.Parameter.KEYWORD_ONLY
        added = [inspect.Parameter(n, keyword, default=None, annotation=t) for n, t in shared.items()]
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + added

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in shared}
            return fn(options=Options(load_settings(), **values), **kwargs)

        wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper  # type: ignore[return-value]

    return decorate
