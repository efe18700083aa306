"""The API's request and response bodies (pydantic models, hence the OpenAPI document).

Bounds live here as field constraints, so a `top_k` of 100000 or an unknown field is a 422
naming the field before any work is done. Responses carry what `conchdb search --json`
prints, plus the URLs of each hit's tile image and slide viewer.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from conchdb.search.searcher import MAX_TOP_K
from conchdb.search.steer import DEFAULT_CONCEPT_WEIGHT, MAX_CONCEPT_WEIGHT, MAX_CONCEPTS, MAX_EXAMPLES

MAX_QUERY_CHARS = 1000
MAX_PAGE = 10_000
MAX_SLIDE_ID_CHARS = 1024

FiltersField = Field(
    None,
    description='Payload filters: {"site": "colon", "grade": {"gte": 2}, "diagnosis": {"in": ["a", "b"]}}; '
    "operators eq, ne, in, nin, gt, gte, lt, lte; conditions are AND-combined.",
    examples=[{"site": "colon", "grade": {"gte": 2}}],
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchOptions(Strict):
    """How many results, which page, which tiles, grouped or not."""

    top_k: int = Field(10, ge=1, le=MAX_TOP_K, description="Results per page.")
    page: int = Field(1, ge=1, le=MAX_PAGE, description="Page of results; 2 is results top_k+1 to 2×top_k.")
    filters: dict[str, Any] | None = FiltersField
    group_by: str | None = Field(
        None, max_length=200, description="'slide' (or a payload field): one result per slide."
    )
    group_size: int = Field(3, ge=1, le=100, description="Tiles kept per group.")
    min_score: float | None = Field(None, ge=-1.0, le=1.0, description="Leave out hits below this cosine.")


class Concept(Strict):
    """A text to move the query toward (`more`) or away from (`less`): q' = normalize(q ± weight·t)."""

    text: str = Field(min_length=1, max_length=MAX_QUERY_CHARS, description="The concept, in words.")
    weight: float = Field(DEFAULT_CONCEPT_WEIGHT, gt=0, le=MAX_CONCEPT_WEIGHT, description="How far to move.")


class Steering(Strict):
    """Refine by concept: texts whose CONCH vectors are added to or subtracted from the query."""

    more: list[Concept] = Field(default_factory=list, max_length=MAX_CONCEPTS,
                                description="More of these: [{\"text\": \"necrosis\", \"weight\": 0.5}].")
    less: list[Concept] = Field(default_factory=list, max_length=MAX_CONCEPTS, description="Less of these.")


class TextSearch(SearchOptions, Steering):
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS, description="What to look for, in words.")
    ensemble: bool = Field(False, description="Average the text over CONCH-style prompt templates.")


class SlideSearch(Strict):
    """Stored slides like a stored slide (ranked against its mosaic)."""

    slide_id: str = Field(min_length=1, max_length=MAX_SLIDE_ID_CHARS, description="The stored query slide.")
    top_k: int = Field(10, ge=1, le=MAX_TOP_K, description="Slides to return.")
    filters: dict[str, Any] | None = FiltersField
    exclude_same: list[str] = Field(
        default_factory=list, max_length=8,
        description="Fields whose query value leaves slides out (e.g. patient_id); the query slide always is.",
    )
    candidates: int | None = Field(
        None, ge=1, le=1000, description="Slides scored exactly (default 40): more is slower and surer."
    )


class SlideSearchResponse(BaseModel):
    slide_id: str
    mosaic_tiles: int
    results: list[dict[str, Any]] = Field(description="rank, slide_id, score, matched_tiles, payload per slide.")


class ImageQuery(Strict):
    """A stored image: a point (tile) id, or a rectangle of a stored slide in level-0 pixels."""

    point_id: str | None = Field(None, max_length=64, description="Id of a stored tile.")
    slide_id: str | None = Field(None, min_length=1, max_length=MAX_SLIDE_ID_CHARS, description="A stored slide.")
    x: int | None = Field(None, ge=0, le=10_000_000)
    y: int | None = Field(None, ge=0, le=10_000_000)
    w: int | None = Field(None, ge=1, le=10_000_000)
    h: int | None = Field(None, ge=1, le=10_000_000)


class ImageSearch(SearchOptions, ImageQuery, Steering):
    """Search by a stored tile or slide region (JSON), or by an uploaded image (multipart)."""


class RefineSearch(SearchOptions, ImageQuery, Steering):
    """A search again, steered by example: the query as /search/text or /search/image (JSON)
    take it, plus the ids of hits marked relevant (`like`) and not relevant (`unlike`); the
    marked tiles are left out of the results."""

    query: str | None = Field(None, min_length=1, max_length=MAX_QUERY_CHARS, description="A text query.")
    ensemble: bool = Field(False, description="Average the text over CONCH-style prompt templates.")
    like: list[str] = Field(default_factory=list, max_length=MAX_EXAMPLES, description="Ids of relevant hits.")
    unlike: list[str] = Field(default_factory=list, max_length=MAX_EXAMPLES, description="Ids of irrelevant hits.")


class Describe(ImageQuery):
    top_k: int = Field(10, ge=1, le=MAX_TOP_K, description="Number of texts.")


class Classify(ImageQuery):
    labels: list[str] | None = Field(None, min_length=2, max_length=64, description="Class names, two or more.")
    prompts: dict[str, list[str]] | None = Field(
        None, description="Class name -> sentences whose mean vector is the class (instead of labels)."
    )
    ensemble: bool = Field(False, description="Put each label into CONCH-style templates.")
    topk: list[int] | None = Field(
        None, min_length=1, max_length=16, description="MI-Zero on a stored slide: k values of top-k pooling."
    )
    filters: dict[str, Any] | None = FiltersField


class Hit(BaseModel):
    rank: int
    score: float
    id: str
    slide_id: Any = None
    x: Any = None
    y: Any = None
    size: Any = None
    payload: dict[str, Any]
    weak: bool | None = Field(None, description="Below the collection's noise floor (null: none recorded).")
    tile_url: str = Field(description="The tile's pixels, cut from its slide at its stored resolution.")
    viewer_url: str = Field(description="The web page's viewer on this tile's slide, centred on the tile.")
    slide_file: str = Field("present", description="`present`, `missing` (the slide file is gone: tile image "
                            "and viewer answer 404 with the path it was last seen at) or `none`.")
    tiles: list[Hit] | None = None


class SearchResponse(BaseModel):
    hits: list[Hit]
    top_k: int
    page: int
    collection: str
    noise_floor: float | None = Field(
        None, description="Cosine that random tiles of different slides reach; hits below it are weak."
    )


class TextMatch(BaseModel):
    rank: int
    score: float
    text: str
    source: str
    id: str | None = None
    metadata: dict[str, Any] = {}


class DescribeResponse(BaseModel):
    texts: list[TextMatch]


class ClassScore(BaseModel):
    label: str
    probability: float
    logit: float


class ClassifyResponse(BaseModel):
    prediction: str
    classes: list[ClassScore]


class PooledScore(ClassifyResponse):
    k: int
    k_used: int


class SlideClassifyResponse(BaseModel):
    slide_id: str
    tiles: int
    results: list[PooledScore]


class SlideRecord(BaseModel):
    slide_id: str
    records: list[dict[str, Any]] = Field(description="The slide's records (one per cohort and tiling).")
    dzi_url: str
    thumbnail_url: str


class SlidePage(BaseModel):
    slides: list[dict[str, Any]]
    total: int
    page: int
    page_size: int


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    store: bool
    model: bool
    collection: str
    points: int | None = None
    model_fingerprint: str | None = None
    process: int | None = Field(None, description="id of the server process that answered (`serve --workers N` runs N)")


class FieldInfo(BaseModel):
    name: str
    type: str


class Schema(BaseModel):
    collection: str
    fields: list[FieldInfo]
    declared: bool


class FieldValue(BaseModel):
    value: Any
    tiles: int = Field(description="Stored tiles holding the value.")
    slides: int | None = Field(None, description="Slides holding it, where the slide records carry the field.")


class FieldSummary(FieldInfo):
    source: Literal["metadata", "conchdb"] = Field(
        description="'metadata': a column of the slides' manifest; 'conchdb': conchdb's own bookkeeping."
    )
    values: list[FieldValue] | None = Field(
        None, description="Every stored value with its counts (keyword, bool, integer fields; None when too many)."
    )
    min: float | None = None
    max: float | None = None


class Fields(BaseModel):
    collection: str
    fields: list[FieldSummary]


class ErrorBody(BaseModel):
    error: str
    field: str | None = None
    fix: str | None = None
