"""The profile's report: rows by block and operator kind, a text table, CSV, JSON and a chart.

A row sums the stages of the query by steps that belong to one block (embedding, layerN, head)
and one operator kind, as ``cipherprompt.models.bert.classifier_blocks`` assigns them. Costs
are the client's view: ``bytes_sent`` goes from the client to the server.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cipherprompt.files import write_atomically, write_text_atomically

JSON_NAME = "profile.json"
CSV_NAME = "profile.csv"
CHART_NAME = "profile.png"

# Operator kinds in the order of a layer, for tables and charts.
OPERATOR_ORDER = ("embedding", "linear", "attention_products", "attention_normaliser",
                  "activation", "layer_normaliser", "head")


@dataclass
class CostRow:
    """Cost of one block and operator kind, or of a whole query, from the client's view."""

    block: str
    operator: str
    steps: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # Client to server.
    bytes_sent: int = 0
    # Server to client.
    bytes_received: int = 0
    messages: int = 0

    @property
    def bytes(self) -> int:
        return self.bytes_sent + self.bytes_received

    def add(self, step: str, seconds: float, sent: int, received: int, messages: int) -> None:
        self.steps.append(step)
        self.seconds += seconds
        self.bytes_sent += sent
        self.bytes_received += received
        self.messages += messages

    def to_dict(self, total: CostRow | None = None) -> dict:
        data = asdict(self)
        if total is not None:
            data["seconds_share"] = self.seconds / total.seconds if total.seconds else 0.0
            data["bytes_share"] = self.bytes / total.bytes if total.bytes else 0.0
        return data


def query_total(cost, name: str) -> CostRow:
    """Sum a QueryCost's stages into one row."""
    row = CostRow(name, "all")
    for stage in cost.stages:
        row.add(stage.stage, stage.seconds, stage.bytes_sent, stage.bytes_received,
                stage.messages_sent + stage.messages_received)
    return row


def attribute(cost, blocks) -> list[CostRow]:
    """Sum the stages of a run by steps into one row per block and operator kind.

    Every stage must be a step of ``blocks`` (the model's ``classifier_blocks``); the rows
    follow the order of the blocks and, within a block, ``OPERATOR_ORDER``.
    """
    owner = {f"{block.scope}/{step.name}": (block.scope, step.operator)
             for block in blocks for step in block.steps}
    rows: dict[tuple[str, str], CostRow] = {}
    for stage in cost.stages:
        if stage.stage not in owner:
            raise ValueError(f"stage {stage.stage!r} is not a step of the model; expected "
                             "the program of compile_classifier_steps")
        block, operator = owner[stage.stage]
        row = rows.setdefault((block, operator), CostRow(block, operator))
        row.add(stage.stage.split("/", 1)[1], stage.seconds, stage.bytes_sent,
                stage.bytes_received, stage.messages_sent + stage.messages_received)
    block_order = [block.scope for block in blocks]
    return sorted(rows.values(), key=lambda row: (block_order.index(row.block),
                                                  OPERATOR_ORDER.index(row.operator)))


def group_rows(rows: list[CostRow], by: str) -> list[CostRow]:
    """Sum ``rows`` by ``block`` or by ``operator``, keeping the order of first appearance."""
    groups: dict[str, CostRow] = {}
    for row in rows:
        key = getattr(row, by)
        group = groups.setdefault(key, CostRow(key if by == "block" else "all",
                                               key if by == "operator" else "all"))
        group.steps += [f"{row.block}/{step}" for step in row.steps]
        group.seconds += row.seconds
        group.bytes_sent += row.bytes_sent
        group.bytes_received += row.bytes_received
        group.messages += row.messages
    if by == "operator":
        return sorted(groups.values(), key=lambda row: OPERATOR_ORDER.index(row.operator))
    return list(groups.values())


def difference(steps: CostRow, fused: CostRow) -> dict:
    """Return what the query by steps cost more than the normal staged query."""
    return {
        "seconds": steps.seconds - fused.seconds,
        "bytes_sent": steps.bytes_sent - fused.bytes_sent,
        "bytes_received": steps.bytes_received - fused.bytes_received,
        "messages": steps.messages - fused.messages,
        "bytes_ratio": steps.bytes / fused.bytes if fused.bytes else None,
        "seconds_ratio": steps.seconds / fused.seconds if fused.seconds else None,
    }


# -- output -----------------------------------------------------------------------------------


def _megabytes(count: float) -> str:
    return f"{count / 1e6:.2f} MB"


def format_table(report: dict) -> str:
    """Format the report as plain-text tables: block x operator, per operator kind, totals."""
    header = (f"{'block':<11}{'operator':<22}{'seconds':>9}{'share':>7}{'sent':>12}"
              f"{'received':>12}{'messages':>9}{'share':>7}")
    lines = [f"private query cost by block and operator ({report['config']['source']}, plan "
             f"{report['config']['plan']['name']}, {report['config']['seq_len']} tokens; "
             "sent = client to server)", header]

    def add(row: dict) -> None:
        seconds_share = f"{100 * row['seconds_share']:.1f}%" if "seconds_share" in row else ""
        bytes_share = f"{100 * row['bytes_share']:.1f}%" if "bytes_share" in row else ""
        lines.append(f"{row['block']:<11}{row['operator']:<22}{row['seconds']:>9.2f}"
                     f"{seconds_share:>7}{_megabytes(row['bytes_sent']):>12}"
                     f"{_megabytes(row['bytes_received']):>12}{row['messages']:>9}"
                     f"{bytes_share:>7}")

    for row in report["rows"]:
        add(row)
    lines += ["-- by operator kind (all blocks) --"]
    for row in report["by_operator"]:
        add(row)
    lines.append("-" * len(header))
    add({**report["total"], "block": "total", "operator": "(sum of steps)"})
    add({**report["fused"], "block": "fused", "operator": "(normal staged query)"})
    if "warm_up" in report:
        add({**report["warm_up"], "block": "warm-up", "operator": "(first query, set-up)"})
    overhead = report["attribution_overhead"]
    lines.append(f"attribution overhead (steps - fused): {overhead['seconds']:+.2f} s, "
                 f"{overhead['bytes_sent'] / 1e6:+.2f} MB sent, "
                 f"{overhead['bytes_received'] / 1e6:+.2f} MB received, "
                 f"{overhead['messages']:+d} messages")
    errors = ", ".join(f"{label} {value:.1e}"
                       for label, value in report["max_abs_logit_error"].items())
    lines.append(f"max abs logit error against plaintext: {errors}")
    return "\n".join(lines)


CSV_COLUMNS = ("block", "operator", "steps", "seconds", "seconds_share", "bytes_sent",
               "bytes_received", "bytes_share", "messages")


def render_csv(report: dict) -> str:
    """Render one CSV line per block and operator kind; the lines sum to the total."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for row in report["rows"]:
        values = {**row, "steps": " ".join(row["steps"])}
        writer.writerow([values[column] for column in CSV_COLUMNS])
    return out.getvalue()


def write_chart(path: Path, report: dict) -> None:
    """Draw traffic and seconds per block, stacked by operator kind, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    blocks = [row["block"] for row in report["by_block"]]
    figure = Figure(figsize=(max(8.0, 0.55 * len(blocks) + 4.5), 6.5), dpi=120)
    axes_bytes, axes_seconds = figure.subplots(2, 1, sharex=True)
    for axes, key, scale, label in ((axes_bytes, "bytes", 1e6, "MB (both ways)"),
                                    (axes_seconds, "seconds", 1.0, "seconds")):
        bottom = np.zeros(len(blocks))
        for operator in OPERATOR_ORDER:
            values = np.zeros(len(blocks))
            for row in report["rows"]:
                if row["operator"] == operator:
                    amount = row["bytes_sent"] + row["bytes_received"] if key == "bytes" else (
                        row["seconds"])
                    values[blocks.index(row["block"])] = amount / scale
            if values.any():
                axes.bar(blocks, values, bottom=bottom, label=operator)
                bottom += values
        axes.set_ylabel(label)
    config = report["config"]
    axes_bytes.set_title(f"{config['source']}, plan {config['plan']['name']}, "
                         f"{config['seq_len']} tokens", fontsize=9)
    axes_bytes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes_seconds.tick_params(axis="x", rotation=45)
    figure.tight_layout()
    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png"))


def write_report(report: dict, out_dir: Path) -> list[Path]:
    """Write the chart, the CSV and then the JSON under ``out_dir``, each atomically.

    The JSON comes last, so a complete JSON file means the run finished.
    """
    out_dir = Path(out_dir)
    paths = [out_dir / CHART_NAME, out_dir / CSV_NAME, out_dir / JSON_NAME]
    write_chart(paths[0], report)
    write_text_atomically(paths[1], render_csv(report))
    write_text_atomically(paths[2], json.dumps(report, indent=2) + "\n")
    return paths
