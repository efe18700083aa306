"""The built-in vocabulary: histopathology terms that image -> text falls back on.

When no texts were added to a store (`conchdb texts add`), `describe` ranks these terms
instead, so a user gets words for a tile on the first day. The list was written for
conchdb, grouped by kind so that results can say what sort of term matched. Each term is
embedded inside one neutral sentence (`TEMPLATE`), closer to the captions CONCH was
trained on than a bare word, and without naming a stain, since stains are terms here too.

Embedding ~250 sentences with the full text tower takes seconds on a CPU, so the vectors
are computed once per model and kept as an .npy file named by the model fingerprint and a
hash of the terms: a new model or an edited list gets new vectors, nothing else does.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conchdb.search.prompts import TextEncoder, fill, normalize

TEMPLATE = "a histopathology image showing CLASSNAME."

TERMS: dict[str, tuple[str, ...]] = {
    "normal tissue": (
        "normal colonic mucosa", "normal small intestinal mucosa", "gastric fundic mucosa",
        "gastric antral mucosa", "squamous epithelium of the esophagus", "normal liver parenchyma",
        "portal tract", "pancreatic acini", "islets of Langerhans", "normal kidney cortex", "renal glomeruli",
        "renal tubules", "normal lung alveoli", "bronchial epithelium", "normal breast lobules",
        "breast ducts", "normal prostate glands", "seminiferous tubules", "normal endometrium",
        "myometrium", "cervical squamous epithelium", "ovarian stroma", "thyroid follicles",
        "adrenal cortex", "lymph node", "lymphoid follicle with germinal center", "spleen red pulp",
        "bone marrow", "skin epidermis", "dermis", "hair follicle", "sebaceous glands", "eccrine sweat glands",
        "skeletal muscle", "smooth muscle", "cardiac muscle", "adipose tissue", "peripheral nerve",
        "blood vessels", "cartilage", "bone trabeculae", "brain gray matter", "brain white matter",
        "salivary gland", "urothelium", "placental villi", "fibrous stroma", "loose connective tissue",
    ),
    "tumour": (
        "adenocarcinoma", "colorectal adenocarcinoma", "gastric adenocarcinoma", "signet ring cell carcinoma",
        "pancreatic ductal adenocarcinoma", "lung adenocarcinoma", "lung squamous cell carcinoma",
        "small cell lung carcinoma", "large cell carcinoma", "carcinoid tumor", "neuroendocrine tumor",
        "invasive ductal carcinoma of the breast", "invasive lobular carcinoma of the breast",
        "ductal carcinoma in situ", "mucinous carcinoma", "medullary carcinoma",
        "squamous cell carcinoma of the skin", "basal cell carcinoma", "melanoma", "melanoma in situ",
        "hepatocellular carcinoma", "cholangiocarcinoma", "clear cell renal cell carcinoma",
        "papillary renal cell carcinoma", "chromophobe renal cell carcinoma", "urothelial carcinoma",
        "prostate adenocarcinoma", "high-grade serous carcinoma of the ovary", "endometrioid carcinoma",
        "cervical squamous cell carcinoma", "papillary thyroid carcinoma", "follicular thyroid carcinoma",
        "glioblastoma", "low-grade glioma", "oligodendroglioma", "meningioma", "diffuse large B-cell lymphoma",
        "follicular lymphoma", "Hodgkin lymphoma", "leiomyosarcoma", "liposarcoma", "rhabdomyosarcoma",
        "osteosarcoma", "gastrointestinal stromal tumor", "metastatic carcinoma in a lymph node",
        "tubular adenoma", "villous adenoma", "sessile serrated lesion", "hyperplastic polyp",
        "fibroadenoma", "benign nevus", "dysplastic nevus", "leiomyoma", "lipoma", "hemangioma",
        "seminoma", "Wilms tumor", "neuroblastoma", "mesothelioma", "adrenocortical carcinoma",
        "pheochromocytoma", "thymoma",
    ),
    "pattern": (
        "glandular differentiation", "cribriform pattern", "solid growth pattern", "papillary architecture",
        "micropapillary pattern", "lepidic growth", "acinar pattern", "tubular pattern", "trabecular pattern",
        "nested pattern", "sheets of tumor cells", "single-file infiltration", "keratin pearls",
        "intercellular bridges", "comedonecrosis", "geographic necrosis", "coagulative necrosis",
        "tumor necrosis", "desmoplastic stroma", "tumor-associated stroma", "tumor budding",
        "perineural invasion", "lymphovascular invasion", "high-grade dysplasia", "low-grade dysplasia",
        "nuclear pleomorphism", "prominent nucleoli", "mitotic figures", "atypical mitoses",
        "high nuclear to cytoplasmic ratio", "hyperchromatic nuclei", "vesicular chromatin",
        "clear cytoplasm", "eosinophilic cytoplasm", "mucin pools", "extracellular mucin",
        "psammoma bodies", "calcification", "fibrosis", "hyalinized stroma", "edema", "granuloma",
        "caseating granuloma", "multinucleated giant cells", "abscess", "ulceration", "granulation tissue",
        "hemorrhage", "hemosiderin-laden macrophages", "foamy macrophages", "cirrhosis", "steatosis",
        "intestinal metaplasia", "squamous metaplasia", "atrophy", "hyperplasia", "Gleason pattern 3",
        "Gleason pattern 4", "Gleason pattern 5", "rosettes", "palisading necrosis",
        "microvascular proliferation", "storiform pattern", "spindle cells", "epithelioid cells",
    ),
    "cells": (
        "lymphocytes", "tumor-infiltrating lymphocytes", "plasma cells", "neutrophils", "eosinophils",
        "mast cells", "macrophages", "histiocytes", "fibroblasts", "endothelial cells", "red blood cells",
        "megakaryocytes", "hepatocytes", "goblet cells", "Paneth cells", "parietal cells", "chief cells",
        "keratinocytes", "melanocytes", "adipocytes", "osteoclasts", "myoepithelial cells",
        "Reed-Sternberg cells", "acute inflammation", "chronic inflammation", "lymphoid aggregates",
        "inflammatory infiltrate", "cell debris", "apoptotic bodies", "mucus",
    ),
    "stain": (
        "hematoxylin and eosin stain", "periodic acid-Schiff stain", "Masson trichrome stain",
        "reticulin stain", "Congo red stain", "Ziehl-Neelsen stain", "Gomori methenamine silver stain",
        "Alcian blue stain", "iron stain", "elastic stain", "Giemsa stain", "Gram stain", "mucicarmine stain",
        "immunohistochemistry", "Ki-67 immunostain", "HER2 immunostain", "estrogen receptor immunostain",
        "PD-L1 immunostain", "cytokeratin immunostain", "CD3 immunostain", "CD20 immunostain",
        "p53 immunostain", "DAB brown chromogen", "frozen section", "cytology smear",
    ),
    "artefact": (
        "tissue fold", "air bubble", "pen marking", "out-of-focus area", "blurry image", "crush artefact",
        "cautery artefact", "knife chatter", "tissue tear", "formalin pigment", "dust on the slide",
        "coverslip edge", "background glass", "empty space", "uneven staining", "overstained section",
        "understained section", "freezing artefact", "floaters", "debris on the slide", "saturated image",
    ),
}
"""Terms by kind: normal tissue, tumour types and subtypes, patterns, cells, stains, artefacts."""


@dataclass(frozen=True)
class Vocabulary:
    """The terms, their kinds, and their (N, 512) normalized sentence vectors."""

    terms: tuple[str, ...]
    kinds: tuple[str, ...]
    vectors: np.ndarray


def all_terms() -> list[tuple[str, str]]:
    """(term, kind) for every term, in a fixed order."""
    return [(term, kind) for kind, terms in TERMS.items() for term in terms]


def vocabulary_key(fingerprint: str) -> str:
    """Cache key: the model and exactly which sentences were embedded."""
    sentences = [fill([TEMPLATE], term)[0] for term, _ in all_terms()]
    digest = hashlib.sha256(json.dumps(sentences).encode()).hexdigest()[:12]
    return f"vocabulary-{fingerprint}-{digest}"


def load_vocabulary(encoder: TextEncoder, fingerprint: str, cache_dir: Path | None) -> Vocabulary:
    """The vocabulary's vectors: read from `cache_dir` when cached for this model, else embedded
    and written there (atomically, so two processes racing leave one good file)."""
    pairs = all_terms()
    terms, kinds = tuple(t for t, _ in pairs), tuple(k for _, k in pairs)
    file = cache_dir / f"{vocabulary_key(fingerprint)}.npy" if cache_dir is not None else None
    if file is not None and file.is_file():
        try:
            vectors = np.load(file)
            if vectors.shape[0] == len(terms):
                return Vocabulary(terms, kinds, vectors.astype(np.float32))
        except (OSError, ValueError):
            pass  # a damaged cache file is rebuilt below
    vectors = normalize(encoder.encode_texts([fill([TEMPLATE], t)[0] for t in terms]))
    if file is not None:
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_name(f"{file.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, vectors)
            os.replace(tmp, file)
        except OSError:
            pass  # a read-only home only costs the re-embedding next time
    return Vocabulary(terms, kinds, vectors)
