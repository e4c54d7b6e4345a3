"""Leaderboards: one JSON file of entries, validated, submitted to safely, rendered and compared.

A leaderboard keeps two kinds of entries side by side (MTEB / lm-evaluation-harness style: a number
is worth only as much as the record of how it was made):

* ``measured``: made by ``densebench submit`` from a result record whose integrity hash checks out.
  Its config is compared with the benchmark's canonical config (the protocol's published defaults);
  a mismatch, or synthetic data, makes it *non-standard*, accepted only when asked for and always
  shown as such.
* ``published``: reference numbers copied verbatim from a paper or README, each with its citation
  and the protocol variant as the source reports it. Sources that disagree stay separate entries.

Every entry names the protocol version whose code produced it (``protocol``: hbird-1.1, hbird-2.0,
neco-leopart, ...). "Standard" means the canonical config of that version; a view's column holds one version
and comparisons pair entries of one version, so like is compared with like. Views show one row per model
(standard entries merged across runs and sources, each kind of non-standard entry its own marked row) with a
mean and an average rank over the benchmarks shown (docs/leaderboard.md).

Writes happen under a file lock and through an atomic rename, so concurrent submissions both land
and a failed write (full disk) leaves the previous file byte-identical.

Modules: ``store`` (the file: schema version, validate, load, write), ``entries`` (result -> entry,
canonical-config check), ``submit`` (the locked all-or-none submit), ``view`` (the models x benchmarks
view: rows, columns, mean / rank, sorting, cell text), ``render`` (terminal table, Markdown, CSV, JSON, plain,
HTML), ``page`` (the self-contained
HTML page with ``board.css`` / ``board.js``), ``compare`` (two models side by side).
"""

from .compare import compare_models, model_entries, render_comparison
from .entries import (architecture_label, benchmark_protocol, canonical_config, check_config,
                      config_differences, dataset_reasons, entry_from_result, entry_version, headline_metrics,
                      published_entry_id, semantic_config)
from .page import esc, html_page, html_select
from .render import (FORMATS, TerminalBoard, render, render_csv, render_html, render_json, render_markdown,
                     render_plain, render_table)
from .store import (LEADERBOARD_SCHEMA_VERSION, SOURCES, default_leaderboard, load_leaderboard,
                    new_leaderboard, validate_leaderboard, write_leaderboard)
from .submit import Submission, submit
from .view import (DISAGREE_MARK, NONSTANDARD_MARK, BoardView, Column, Row, benchmark_sort_key, build_view,
                   short_fingerprint, sort_view)

__all__ = [
    "DISAGREE_MARK", "FORMATS", "LEADERBOARD_SCHEMA_VERSION", "NONSTANDARD_MARK", "SOURCES",
    "BoardView", "Column", "Row", "Submission", "TerminalBoard",
    "architecture_label", "benchmark_protocol", "benchmark_sort_key", "build_view", "canonical_config",
    "check_config", "compare_models", "config_differences", "dataset_reasons", "default_leaderboard",
    "entry_from_result", "entry_version",
    "esc", "headline_metrics", "html_page", "html_select", "load_leaderboard", "model_entries",
    "new_leaderboard", "published_entry_id", "render", "render_comparison", "render_csv", "render_html",
    "render_json", "render_markdown", "render_plain", "render_table", "semantic_config", "short_fingerprint",
    "sort_view", "submit",
    "validate_leaderboard", "write_leaderboard",
]
