"""Cost estimate for a pilot: project measured per-operator costs to another model and network.

The input is one or more cost files written by the product (``QueryCost.to_dict()``: per stage,
per SPU operator, seconds, bytes and messages). Each operator's cost in a stage is divided by a
cost driver, a count that the operator's work grows with under CHEETAH, to give a unit cost. The
projection multiplies the unit costs by the drivers of the target model and sequence length, then
adds the network terms:

    time per query = compute seconds + bytes / bandwidth + rounds x round-trip time

``ASSUMPTIONS`` states every rule, and the report prints them. The projection is an estimate.
Its self-check compares it with measured configurations that were left out of the fit.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from cipherprompt.files import write_atomically, write_text_atomically

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Model shapes and networks


@dataclass(frozen=True)
class ModelShape:
    """The public architecture numbers that the cost drivers depend on."""

    name: str
    hidden: int
    heads: int
    kv_heads: int  # fewer than heads for grouped-query attention
    ffn: int
    layers: int
    vocab: int
    gated_ffn: bool = False  # SwiGLU: three FFN matrices instead of two

    def __post_init__(self) -> None:
        for label in ("hidden", "heads", "kv_heads", "ffn", "layers", "vocab"):
            value = getattr(self, label)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model {self.name!r}: {label} must be a positive integer, "
                                 f"got {value!r}")
        if self.hidden % self.heads != 0:
            raise ValueError(f"model {self.name!r}: hidden size {self.hidden} is not divisible "
                             f"by the {self.heads} heads")
        if self.heads % self.kv_heads != 0:
            raise ValueError(f"model {self.name!r}: {self.heads} heads are not a multiple of "
                             f"the {self.kv_heads} key/value heads")

    @property
    def head_size(self) -> int:
        return self.hidden // self.heads

    def describe(self, lang: str = "en") -> str:
        if lang == "ja":
            heads = f"{self.heads} ヘッド" + (
                f" (KV {self.kv_heads})" if self.kv_heads != self.heads else "")
            gated = " (ゲート付き)" if self.gated_ffn else ""
            return (f"{self.name}: hidden {self.hidden}、{heads}、FFN {self.ffn}{gated}、"
                    f"{self.layers} レイヤー、語彙 {self.vocab:,}")
        heads = f"{self.heads} heads" + (
            f" ({self.kv_heads} KV)" if self.kv_heads != self.heads else "")
        gated = " gated" if self.gated_ffn else ""
        return (f"{self.name}: hidden {self.hidden}, {heads}, FFN {self.ffn}{gated}, "
                f"{self.layers} layers, vocabulary {self.vocab:,}")


MODEL_PRESETS: dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        ModelShape("minilm-l6", hidden=384, heads=12, kv_heads=12, ffn=1536, layers=6,
                   vocab=30522),
        ModelShape("bert-base", hidden=768, heads=12, kv_heads=12, ffn=3072, layers=12,
                   vocab=30522),
        ModelShape("bert-large", hidden=1024, heads=16, kv_heads=16, ffn=4096, layers=24,
                   vocab=30522),
        ModelShape("smollm2-135m", hidden=576, heads=9, kv_heads=3, ffn=1536, layers=30,
                   vocab=49152, gated_ffn=True),
    )
}


@dataclass(frozen=True)
class Network:
    """A link between client and server. Loopback adds nothing to the measured seconds."""

    name: str
    bandwidth_bit_s: float  # math.inf for loopback
    rtt_s: float

    def __post_init__(self) -> None:
        if not self.bandwidth_bit_s > 0:
            raise ValueError(f"network {self.name!r}: bandwidth must be positive, got "
                             f"{self.bandwidth_bit_s!r} bit/s")
        if not self.rtt_s >= 0:
            raise ValueError(f"network {self.name!r}: round-trip time must not be negative, "
                             f"got {self.rtt_s!r} s")

    def describe(self) -> str:
        if math.isinf(self.bandwidth_bit_s):
            return "as measured"
        return f"{_format_bandwidth(self.bandwidth_bit_s)}, RTT {self.rtt_s * 1000:g} ms"


NETWORK_PRESETS: dict[str, Network] = {
    network.name: network
    for network in (
        Network("loopback", math.inf, 0.0),
        Network("lan", 3e9, 0.001),
        Network("wan", 100e6, 0.040),
    )
}


def model_preset(name: str) -> ModelShape:
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; valid presets: "
                         f"{', '.join(MODEL_PRESETS)}, custom") from None


def network_preset(name: str) -> Network:
    try:
        return NETWORK_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown network preset {name!r}; valid presets: "
                         f"{', '.join(NETWORK_PRESETS)}, custom") from None


def custom_network(bandwidth_mbit_s: float | None, rtt_ms: float | None) -> Network:
    """A network from --bandwidth-mbit and --rtt-ms; both must be given and positive."""
    for label, value in (("--bandwidth-mbit", bandwidth_mbit_s), ("--rtt-ms", rtt_ms)):
        if value is None:
            raise ValueError(f"--network custom needs {label}")
        if not value > 0:
            raise ValueError(f"{label} must be positive, got {value!r}; to keep the measured "
                             "link as it is, use --network loopback")
    return Network("custom", bandwidth_mbit_s * 1e6, rtt_ms / 1000)


# ---------------------------------------------------------------------------------------------
# Cost drivers and scaling rules

# Each SPU operator of a stage scales with one driver for seconds and one for bytes. Operators
# not listed scale with HIDDEN_ELEMENTS, and so does the part of a stage's total that no
# operator row accounts for.
MATMUL_IO = "server-weight matrix products: input + output elements"
ATTENTION_MACS = "attention products: multiply-accumulates"
ATTENTION_IO = "attention products: operand + output elements"
EMBEDDING_IO = "embedding product: seq x (vocab + hidden)"
FFN_ELEMENTS = "FFN activation elements: seq x ffn"
SCORE_ELEMENTS = "attention score elements: heads x seq^2"
SCORE_ROWS = "attention score rows: heads x seq"
NORM_ROWS = "normalised rows: 2 x seq"
MULTIPLY_ELEMENTS = "element-wise products: 6 seq x ffn + 5 heads x seq^2 + 6 seq x hidden"
HIDDEN_ELEMENTS = "hidden-state elements: seq x hidden"

OTHER_OPERATOR = "(rest of stage)"

# NOTE: the rules have no fixed cost per operator call. In a layer with hidden 128 and 2 heads,
# exponential, dot_general and reciprocal sent nearly the same bytes at 64 tokens as at 32.
LAYER_RULES: dict[str, tuple[str, str]] = {
    "dot": (MATMUL_IO, MATMUL_IO),
    "dot_general": (ATTENTION_MACS, ATTENTION_IO),
    "tanh": (FFN_ELEMENTS, FFN_ELEMENTS),
    "exponential": (SCORE_ELEMENTS, SCORE_ELEMENTS),
    "less": (SCORE_ELEMENTS, SCORE_ELEMENTS),
    "reduce": (SCORE_ELEMENTS, SCORE_ELEMENTS),
    "reciprocal": (SCORE_ROWS, SCORE_ROWS),
    "rsqrt": (NORM_ROWS, NORM_ROWS),
    "multiply": (MULTIPLY_ELEMENTS, MULTIPLY_ELEMENTS),
}
EMBEDDING_RULES: dict[str, tuple[str, str]] = {"dot": (EMBEDDING_IO, EMBEDDING_IO)}
HEAD_RULES: dict[str, tuple[str, str]] = {}
STAGE_RULES = {"embedding": EMBEDDING_RULES, "layer": LAYER_RULES, "head": HEAD_RULES}
STAGE_KINDS = tuple(STAGE_RULES)

ASSUMPTIONS: dict[str, tuple[str, ...]] = {
    "en": (
        ("Unit costs are seconds and bytes per driver unit, measured per SPU operator and stage "
         "kind (embedding, average layer, head), pooled over all fitted measurements."),
        ("Products with a server-owned weight (`dot`, HE): seconds and bytes scale with "
         "seq x (d_in + d_out), the input and output elements. CHEETAH sends the encrypted "
         "input and returns the masked output while the weight stays with the server. Seconds "
         "are assumed to follow the same count (encryption, NTT, truncation) rather than "
         "seq x d_in x d_out. In two demo runs of MiniLM the embedding product had 6.6 times "
         "the multiply-accumulates of one layer's six products but took 1.7 to 2.9 times as "
         "long."),
        ("Attention products of two secrets (`dot_general`): seconds scale with 2 x heads x "
         "seq^2 x head_dim, bytes with the operand and output elements, 2 x heads x seq^2 + 4 x "
         "heads x seq x head_dim."),
        ("Embedding as one-hot x table, priced like the other products: seconds and bytes "
         "scale with seq x (vocab + hidden)."),
        ("Non-linear operators (OT) cost the same per element whatever tensor they apply to. "
         "`tanh` applies to seq x ffn (GELU), `exponential`, `less` and `reduce` to heads x "
         "seq^2 (softmax), `reciprocal` to heads x seq (one per row) and `rsqrt` to 2 x seq "
         "(two LayerNorms)."),
        ("`multiply` is split by counting the element-wise products of one exact-plan layer: 6 "
         "on the FFN tensor (GELU tanh form), 5 on the score tensor (mask, scale, normalise) and "
         "6 on the hidden tensor (two LayerNorms). Every product is assumed to cost the same per "
         "element."),
        ("Other operators, and the part of a stage that no operator row accounts for, scale with "
         "seq x hidden. The head stage scales wholly with seq x hidden."),
        ("Messages per stage are assumed not to grow with tensor size, and the number of layers "
         "multiplies them. This is the weakest rule. Identical demo queries sent 27,237 and "
         "22,234 messages, because bursts of thousands land in whichever operator is running "
         "(the embedding product sent 6,408 in one query and 126 in the next). If these bursts "
         "refill the OT correlation pool, as they appear to, rounds grow with the OT work and "
         "the projection understates them for larger models. Rounds = messages / 2, each "
         "paying one round-trip time, an upper bound when messages are pipelined."),
        ("Traffic in both directions shares one link: transfer time = (bytes sent + received) / "
         "bandwidth."),
        ("Compute seconds are the seconds measured on the source machine, scaled. On the "
         "loopback preset they are the whole time. Other presets add the transfer and latency "
         "terms on top, so the loopback transfer is counted twice (a small overestimate)."),
        ("The target runs the same operator plan, SPU version and protocol settings as the "
         "source measurement, on a machine like the source machine."),
        ("A gated FFN (SwiGLU) has three FFN matrices and one more product on seq x ffn. Its "
         "SiLU is costed per element as the measured GELU `tanh`. SPU compiles SiLU into exp "
         "and reciprocal, so this part is the least certain."),
        ("A decoder is costed for one forward pass over the prompt (prefill) with the source's "
         "classifier head. Generating tokens (an LM head over the vocabulary, one pass per "
         "token) is not included."),
        "1,000 queries run one after another on one server worker.",
    ),
    "ja": (
        ("単位コストは、SPU の演算子ごと・段階の種類ごと (埋め込み、レイヤー平均、ヘッド) に、"
         "コスト要因 1 単位あたりの秒数とバイト数として計測値から求め、当てはめに使った全計測で"
         "合算した。"),
        ("サーバーが持つ重みとの行列積 (`dot`、HE): 秒数もバイト数も入出力の要素数 "
         "seq x (d_in + d_out) に比例する。CHEETAH では重みがサーバーに留まり、"
         "暗号化した入力とマスクした出力だけが送られる。秒数も seq x d_in x d_out "
         "ではなく同じ要素数 (暗号化、NTT、切り捨て) に従うと仮定した: MiniLM のデモ 2 回"
         "では、埋め込みの積は 1 レイヤー分の 6 つの積の 6.6 倍の積和演算を含むが、"
         "かかった時間は 1.7-2.9 倍だった。"),
        ("秘密値どうしの注意機構の積 (`dot_general`): 秒数は 2 x heads x seq^2 x head_dim に、"
         "バイト数はオペランドと出力の要素数 2 x heads x seq^2 + 4 x heads x seq x head_dim "
         "に比例する。"),
        ("埋め込みは one-hot x 表の積として他の行列積と同様に扱う: 秒数もバイト数も "
         "seq x (vocab + hidden) に比例する。"),
        ("非線形演算子 (OT) の要素あたりのコストは、適用先のテンソルによらず同じとする: "
         "`tanh` は seq x ffn (GELU)、`exponential`・`less`・`reduce` は heads x seq^2 "
         "(softmax)、`reciprocal` は heads x seq (行ごとに 1 回)、`rsqrt` は 2 x seq "
         "(LayerNorm 2 回)。"),
        ("`multiply` は exact プランの 1 レイヤーに含まれる要素積を数えて振り分ける: FFN "
         "テンソルに 6 回 (GELU の tanh 形)、スコアテンソルに 5 回 (マスク、スケール、正規化)、"
         "隠れ状態に 6 回 (LayerNorm 2 回)。要素あたりのコストはどの積も同じとする。"),
        ("その他の演算子と、どの演算子行にも計上されない段階の残りは seq x hidden に比例する。"
         "ヘッドの段階は全体が seq x hidden に比例する。"),
        ("段階あたりのメッセージ数はテンソルの大きさによらないと仮定し、レイヤー数を"
         "掛ける。これが最も弱い前提である。同じ内容のデモのクエリでもメッセージ数は "
         "27,237 と 22,234 と異なり、数千件のまとまった送信がその時に動いている演算子に"
         "計上される (埋め込みの積で、あるクエリでは 6,408 件、次のクエリでは 126 件)。"
         "これが見かけどおり OT の相関プールの補充なら、往復回数は OT の仕事量とともに増え、"
         "大きなモデルでは見積もりが過小になる。往復回数 = メッセージ数 / 2 とし、1 往復"
         "ごとに RTT を 1 回払う。メッセージがパイプライン化される場合は上限値となる。"),
        "両方向の通信は 1 本の回線を共有する: 転送時間 = (送信 + 受信バイト数) / 帯域幅。",
        ("計算時間は元の計測マシンで計測した秒数を拡大縮小したもの。ループバックではこれが"
         "全時間となる。他のネットワークではその上に転送時間と遅延を加えるため、ループバック"
         "上の転送を二重に数える (わずかな過大評価)。"),
        ("対象モデルは、元の計測と同じ演算子プラン・SPU バージョン・プロトコル設定で、同等の"
         "マシン上で動くとする。"),
        ("ゲート付き FFN (SwiGLU) は FFN 行列が 3 つで、seq x ffn の要素積が 1 回多い。SiLU の"
         "要素あたりのコストは計測した GELU の `tanh` と同じとする。SPU は SiLU を exp と "
         "reciprocal に変換するため、この部分が最も不確か。"),
        ("デコーダーはプロンプト全体を 1 回通す順伝播 (prefill) と、元の計測と同じ分類ヘッドで"
         "見積もる。トークン生成 (語彙全体への LM ヘッド、1 トークンごとに 1 回の順伝播) は"
         "含まない。"),
        "1,000 クエリは 1 つのサーバーワーカー上で 1 件ずつ順に処理する。",
    ),
}


def stage_kind(stage: str) -> str:
    """Map a stage name of the cost file to its kind: embedding, layer or head."""
    if stage == "embedding" or stage == "head":
        return stage
    if re.fullmatch(r"layer\d+", stage):
        return "layer"
    raise ValueError(f"unknown stage name {stage!r}; expected embedding, layer0..layerN or head")


def stage_drivers(kind: str, shape: ModelShape, seq: int) -> dict[str, float]:
    """Return the cost drivers of one stage of ``kind`` for ``shape`` at sequence length ``seq``."""
    d, f, h, v = shape.hidden, shape.ffn, shape.heads, shape.vocab
    kv_width = shape.kv_heads * shape.head_size
    ffn_matrices = 3 if shape.gated_ffn else 2
    drivers = {HIDDEN_ELEMENTS: float(seq * d)}
    if kind == "embedding":
        drivers[EMBEDDING_IO] = float(seq * (v + d))
    elif kind == "layer":
        # Query and output projections are d x d, key and value d x kv_width.
        drivers[MATMUL_IO] = float(seq * (2 * 2 * d + 2 * (d + kv_width)
                                          + ffn_matrices * (d + f)))
        drivers[ATTENTION_MACS] = float(2 * h * seq * seq * shape.head_size)
        drivers[ATTENTION_IO] = float(2 * h * seq * seq + 4 * h * seq * shape.head_size)
        drivers[FFN_ELEMENTS] = float(seq * f)
        drivers[SCORE_ELEMENTS] = float(h * seq * seq)
        drivers[SCORE_ROWS] = float(h * seq)
        drivers[NORM_ROWS] = float(2 * seq)
        # NOTE: counted in the JAX source of the exact plan. XLA may fold some constant factors
        # before SPU compiles the program, which would shift the split between the three tensors.
        ffn_products = 7 if shape.gated_ffn else 6
        drivers[MULTIPLY_ELEMENTS] = float(ffn_products * seq * f + 5 * h * seq * seq
                                           + 6 * seq * d)
    elif kind != "head":
        raise ValueError(f"unknown stage kind {kind!r}; expected one of {STAGE_KINDS}")
    return drivers


def operator_drivers(kind: str, operator: str) -> tuple[str, str]:
    """Return the (seconds driver, bytes driver) of ``operator`` in a stage of ``kind``."""
    return STAGE_RULES[kind].get(operator, (HIDDEN_ELEMENTS, HIDDEN_ELEMENTS))


# ---------------------------------------------------------------------------------------------
# Measurements

# A bench run without the embedding feeds the first layer a random secret-shared hidden state
# in this stage. It costs no traffic and is no part of a deployed model, so it is not fitted.
HIDDEN_INPUT_STAGE = "hidden_input"


@dataclass(frozen=True)
class OperatorTotals:
    seconds: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: OperatorTotals) -> OperatorTotals:
        return OperatorTotals(self.seconds + other.seconds, self.bytes + other.bytes)


@dataclass
class StageTotals:
    """One stage kind of a measurement, summed over its stages (all layers for ``layer``)."""

    count: int = 0
    seconds: float = 0.0
    bytes: float = 0.0
    messages: float = 0.0
    operators: dict[str, OperatorTotals] = field(default_factory=dict)


@dataclass
class Measurement:
    """One measured query with the configuration it was measured on."""

    path: Path
    shape: ModelShape
    seq: int
    plan: str
    machine: str
    seconds: float
    bytes: float
    messages: float
    stages: dict[str, StageTotals]
    # (number, total) of the query within a demo report or a bench record's plan.
    query: tuple[int, int] | None = None
    # The first query of a session also pays the OT and HE set-up.
    includes_setup: bool = False
    # A bench record's "machine" and "load_average" objects, described in the page's language.
    machine_record: tuple[object, object] | None = None
    # SPU settings (EngineConfig fields) that the file records. None for a file without them.
    engine: dict | None = None

    def describe_machine(self, lang: str) -> str:
        if self.machine_record is None:
            return self.machine
        return describe_machine(*self.machine_record, lang=lang)

    @property
    def configuration(self) -> tuple[str, int]:
        return (self.shape.name, self.seq)


def _number(data: dict, key: str, where: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{where}: field {key!r} must be a non-negative number, got {value!r}")
    return float(value)


def _parse_stage(stage: dict, where: str) -> tuple[str, StageTotals] | None:
    """Return the stage's kind and totals, or None for the bench's hidden-state input."""
    if not isinstance(stage, dict) or not isinstance(stage.get("stage"), str):
        raise ValueError(f"{where}: each entry of 'stages' needs a string field 'stage'")
    if stage["stage"] == HIDDEN_INPUT_STAGE:
        return None
    try:
        kind = stage_kind(stage["stage"])
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    where = f"{where}, stage {stage['stage']}"
    totals = StageTotals(count=1, seconds=_number(stage, "seconds", where),
                         bytes=_number(stage, "bytes_sent", where)
                         + _number(stage, "bytes_received", where),
                         messages=_number(stage, "messages_sent", where)
                         + _number(stage, "messages_received", where))
    rows = stage.get("operators", [])
    if not isinstance(rows, list):
        raise ValueError(f"{where}: 'operators' must be a list")
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("operator"), str):
            raise ValueError(f"{where}: each operator row needs a string field 'operator'")
        name = row["operator"]
        row_where = f"{where}, operator {name}"
        cost = OperatorTotals(_number(row, "seconds", row_where),
                              _number(row, "bytes_sent", row_where)
                              + _number(row, "bytes_received", row_where))
        totals.operators[name] = totals.operators.get(name, OperatorTotals()) + cost
    return kind, totals


def _read_json(path: Path) -> object:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"measurement file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"measurement file {path} is not readable JSON: {error}") from None


def _query_stages(cost: object, where: str) -> dict[str, StageTotals]:
    """Sum the stages of one cost dict (``QueryCost.to_dict()`` form) by stage kind."""
    if not isinstance(cost, dict) or not isinstance(cost.get("stages"), list):
        raise ValueError(f"{where}: expected a JSON object with a list 'stages', as "
                         "QueryCost.to_dict() writes")
    stages: dict[str, StageTotals] = {}
    for stage in cost["stages"]:
        parsed = _parse_stage(stage, where)
        if parsed is None:
            continue
        kind, totals = parsed
        merged = stages.setdefault(kind, StageTotals())
        merged.count += totals.count
        merged.seconds += totals.seconds
        merged.bytes += totals.bytes
        merged.messages += totals.messages
        for name, cost_row in totals.operators.items():
            merged.operators[name] = merged.operators.get(name, OperatorTotals()) + cost_row
    if stages.get("layer") is None:
        raise ValueError(f"{where}: no layer stages (layer0, layer1, ...) found")
    return stages


def _measurement(path: Path, where: str, stages: dict[str, StageTotals], shape: ModelShape,
                 seq: int, plan: str, machine: str,
                 layers_hint: str = "pass the right --source-model", **extra) -> Measurement:
    if seq <= 0:
        raise ValueError(f"{where}: sequence length must be positive, got {seq}")
    if stages["layer"].count != shape.layers:
        raise ValueError(f"{where}: {stages['layer'].count} layer stages, but the source model "
                         f"{shape.name} has {shape.layers} layers; {layers_hint}")
    return Measurement(path=path, shape=shape, seq=seq, plan=plan, machine=machine,
                       seconds=sum(s.seconds for s in stages.values()),
                       bytes=sum(s.bytes for s in stages.values()),
                       messages=sum(s.messages for s in stages.values()),
                       stages=stages, **extra)


def load_measurement(path: Path, shape: ModelShape, seq: int, plan: str,
                     machine: str) -> Measurement:
    """Read one cost file. Fields ``model`` (a preset name), ``max_len``, ``plan`` and
    ``machine`` in the file override the arguments, because they were recorded with it."""
    path = Path(path)
    data = _read_json(path)
    where = f"measurement file {path}"
    stages = _query_stages(data, where)

    if isinstance(data.get("model"), str):
        shape = model_preset(data["model"])
    if isinstance(data.get("max_len"), int):
        seq = data["max_len"]
    if isinstance(data.get("plan"), str):
        plan = data["plan"]
    if isinstance(data.get("machine"), dict):
        machine = ", ".join(f"{key} {value}" for key, value in data["machine"].items())
    elif isinstance(data.get("machine"), str):
        machine = data["machine"]
    return _measurement(path, where, stages, shape, seq, plan, machine)


def _session_queries(queries: list, where: str) -> list[tuple[int, object]]:
    """Return (number, query) of the queries to fit. The first query of a session also pays the
    OT and HE set-up, so it is left out when later queries exist, as ``bench`` does."""
    if not queries:
        raise ValueError(f"{where}: the record lists no queries")
    numbered = list(enumerate(queries, start=1))
    return numbered[1:] if len(numbered) > 1 else numbered


def _record_int(data: dict, key: str, where: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where}: field {key!r} must be a positive integer, got {value!r}")
    return value


def bench_shape(config: dict, layers: int, where: str = "bench record") -> ModelShape:
    """Return the shape of a bench record's BERT ``config`` with the ``layers`` that ran.

    The name is the matching preset's, else BERT's ``L-H-A`` form (with ``-F`` for an FFN
    other than 4 x hidden), so that two records of one shape form one configuration."""
    sizes = {name: _record_int(config, key, f"{where}, model config") for name, key in (
        ("hidden", "hidden_size"), ("heads", "num_heads"), ("ffn", "intermediate_size"),
        ("vocab", "vocab_size"))}
    shape = ModelShape("bench", kv_heads=sizes["heads"], layers=layers, **sizes)
    for preset in MODEL_PRESETS.values():
        if preset == replace(shape, name=preset.name):
            return preset
    name = f"bert-L{layers}-H{shape.hidden}-A{shape.heads}"
    if shape.ffn != 4 * shape.hidden:
        name += f"-F{shape.ffn}"
    return replace(shape, name=name)


MACHINE_TEXT = {
    "en": {"cores": "{} usable cores", "load": "; 1-minute load average {:.1f} at the start, "
                                               "{:.1f} at the end"},
    "ja": {"cores": "使用可能なコア {} 個", "load": "。1 分間の負荷平均は開始時 {:.1f}、終了時 {:.1f}"},
}


def describe_machine(machine: object, load_average: object = None, lang: str = "en") -> str:
    """Describe a record's machine (``machine_facts()`` form) and its load average."""
    if isinstance(machine, str):
        text = machine
    elif isinstance(machine, dict):
        parts = [str(machine.get("cpu", "unknown CPU"))]
        if "usable_cores" in machine:
            parts.append(MACHINE_TEXT[lang]["cores"].format(machine["usable_cores"]))
        if "memory_gib" in machine:
            parts.append(f"{machine['memory_gib']} GiB")
        if "spu" in machine:
            parts.append(f"spu {machine['spu']}")
        text = ("、" if lang == "ja" else ", ").join(parts)
    else:
        text = ""
    if isinstance(load_average, dict):
        start, end = load_average.get("start"), load_average.get("end")
        if isinstance(start, list) and isinstance(end, list) and start and end:
            text += MACHINE_TEXT[lang]["load"].format(start[0], end[0])
    return text


def _bench_measurements(path: Path, data: dict) -> list[Measurement]:
    """Read a ``cipherprompt bench`` record: one measurement per fitted query of each plan."""
    where = f"bench record {path}"
    model = data.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("config"), dict):
        raise ValueError(f"{where}: the object 'model' or its 'config' is missing")
    layers = model.get("run_layers", model["config"].get("num_layers"))
    if isinstance(layers, bool) or not isinstance(layers, int) or layers <= 0:
        raise ValueError(f"{where}: 'model.run_layers' must be a positive integer, got "
                         f"{layers!r}")
    shape = bench_shape(model["config"], layers, where)
    seq = _record_int(data, "max_len", where)

    # The estimate's compute seconds must not contain transfer or latency that it adds itself.
    network = data.get("network") or {}
    if network.get("bandwidth_bit_s") is not None or (network.get("rtt_s") or 0) > 0:
        raise ValueError(
            f"{where}: measured on the emulated network {network.get('preset')!r}, so its "
            "seconds include transfer and latency; pass a record measured with --network "
            "loopback")
    machine_record = (data.get("machine"), data.get("load_average"))
    machine = describe_machine(*machine_record)
    engine = _engine(data, where)

    measurements = []
    for plan, figures in data["plans"].items():
        queries = figures.get("client_queries") if isinstance(figures, dict) else None
        if not isinstance(queries, list):
            raise ValueError(f"{where}: plan {plan!r} has no list 'client_queries'")
        for number, query in _session_queries(queries, f"{where}, plan {plan}"):
            query_where = f"{where}, plan {plan}, query {number}"
            measurements.append(_measurement(
                path, query_where, _query_stages(query, query_where), shape, seq, plan, machine,
                layers_hint="the record's model.run_layers disagrees with its stages",
                query=(number, len(queries)), includes_setup=number == 1,
                machine_record=machine_record, engine=engine))
    return measurements


def _demo_measurements(path: Path, data: dict, shape: ModelShape, seq: int, plan: str,
                       machine: str) -> list[Measurement]:
    """Read a ``cipherprompt demo`` report: one measurement per fitted query. The report does
    not record the model, so the caller passes it as ``shape`` (from --source-model)."""
    where = f"demo report {path}"
    if isinstance(data.get("max_len"), int):
        seq = data["max_len"]
    if isinstance(data.get("plan"), str):
        plan = data["plan"]
    engine = _engine(data, where)
    measurements = []
    for number, query in _session_queries(data["queries"], where):
        query_where = f"{where}, query {number}"
        cost = query.get("cost") if isinstance(query, dict) else None
        measurements.append(_measurement(
            path, query_where, _query_stages(cost, query_where), shape, seq, plan, machine,
            query=(number, len(data["queries"])), includes_setup=number == 1,
            engine=engine))
    return measurements


def _engine(data: dict, where: str) -> dict | None:
    """Return the SPU settings a record states, or None for a record without them."""
    engine = data.get("engine")
    if engine is None or isinstance(engine, dict):
        return engine
    raise ValueError(f"{where}: invalid 'engine' {engine!r}; expected an object of SPU "
                     "settings, as cipherprompt bench writes")


def check_engines(measurements: list[Measurement]) -> None:
    """Raise ValueError when the measurements state different SPU settings.

    Unit costs fitted over different settings (``mul_lsb_error`` changes the bytes of every
    product of two secrets) would describe neither. Files that state no settings pass.
    """
    groups: dict[str, set[str]] = {}
    for measurement in measurements:
        if measurement.engine is not None:
            key = json.dumps(measurement.engine, sort_keys=True)
            groups.setdefault(key, set()).add(measurement.path.name)
    if len(groups) > 1:
        described = "; ".join(f"{key} in {', '.join(sorted(names))}"
                              for key, names in groups.items())
        raise ValueError(f"the measurements were made with different SPU settings: {described}; "
                         "pass files measured with the same settings")


def engine_summary(measurements: list[Measurement]) -> dict | None:
    """Return the one engine the measurements state (check_engines ran), or None."""
    return next((m.engine for m in measurements if m.engine is not None), None)


def load_measurements(path: Path, shape: ModelShape, seq: int, plan: str,
                      machine: str) -> list[Measurement]:
    """Read a cost file, a demo report or a bench record and return its measured queries.

    A bench record states its own model, sequence length, plans, machine and network. The
    arguments fill in what a cost file or a demo report does not record."""
    path = Path(path)
    data = _read_json(path)
    if isinstance(data, dict) and isinstance(data.get("plans"), dict):
        return _bench_measurements(path, data)
    if isinstance(data, dict) and isinstance(data.get("queries"), list):
        return _demo_measurements(path, data, shape, seq, plan, machine)
    return [load_measurement(path, shape, seq, plan, machine)]


# ---------------------------------------------------------------------------------------------
# Fit and projection


@dataclass
class UnitCosts:
    """Per stage kind: per-operator (seconds/driver, bytes/driver) and messages per stage."""

    operators: dict[str, dict[str, tuple[float, float]]]
    messages_per_stage: dict[str, float]

    @property
    def stage_kinds(self) -> tuple[str, ...]:
        """The stage kinds that the fitted measurements contain."""
        return tuple(self.operators)


def _stage_residual(totals: StageTotals) -> OperatorTotals:
    rows = OperatorTotals()
    for cost in totals.operators.values():
        rows = rows + cost
    return OperatorTotals(totals.seconds - rows.seconds, totals.bytes - rows.bytes)


def fit_unit_costs(measurements: list[Measurement]) -> UnitCosts:
    """Pool unit costs over ``measurements``: sum of measured cost / sum of its driver."""
    if not measurements:
        raise ValueError("no measurements to fit unit costs on")
    operators: dict[str, dict[str, tuple[float, float]]] = {}
    messages: dict[str, float] = {}
    for kind in STAGE_KINDS:
        sums: dict[str, list[float]] = {}  # operator -> [seconds, s driver, bytes, b driver]
        message_sum = stage_count = 0.0
        for measurement in measurements:
            totals = measurement.stages.get(kind)
            if totals is None:
                continue
            drivers = stage_drivers(kind, measurement.shape, measurement.seq)
            rows = dict(totals.operators)
            rows[OTHER_OPERATOR] = _stage_residual(totals)
            for name, cost in rows.items():
                seconds_driver, bytes_driver = operator_drivers(kind, name)
                entry = sums.setdefault(name, [0.0, 0.0, 0.0, 0.0])
                entry[0] += cost.seconds
                entry[1] += drivers[seconds_driver] * totals.count
                entry[2] += cost.bytes
                entry[3] += drivers[bytes_driver] * totals.count
            message_sum += totals.messages
            stage_count += totals.count
        if not stage_count:
            continue
        operators[kind] = {
            name: (seconds / s_driver if s_driver else 0.0, bytes_ / b_driver if b_driver else 0.0)
            for name, (seconds, s_driver, bytes_, b_driver) in sums.items()
        }
        messages[kind] = message_sum / stage_count
    return UnitCosts(operators, messages)


@dataclass(frozen=True)
class Projection:
    """Projected cost of one query, before the network is added."""

    shape: ModelShape
    seq: int
    seconds: float
    bytes: float
    messages: float
    bytes_by_stage: dict[str, float]
    seconds_by_stage: dict[str, float]
    messages_by_stage: dict[str, float]

    @property
    def rounds(self) -> float:
        return self.messages / 2

    def time_s(self, network: Network) -> float:
        return self.seconds + self.transfer_s(network) + self.latency_s(network)

    def transfer_s(self, network: Network) -> float:
        return self.bytes * 8 / network.bandwidth_bit_s

    def latency_s(self, network: Network) -> float:
        return self.rounds * network.rtt_s


def project(units: UnitCosts, shape: ModelShape, seq: int,
            kinds: tuple[str, ...] | None = None) -> Projection:
    """Apply the unit costs to ``shape`` at sequence length ``seq``, for the stage ``kinds``
    (default: every kind that the unit costs were fitted on)."""
    if seq <= 0:
        raise ValueError(f"sequence length must be positive, got {seq}")
    kinds = units.stage_kinds if kinds is None else kinds
    unfitted = [kind for kind in kinds if kind not in units.operators]
    if unfitted:
        raise ValueError(f"no unit costs for the {', '.join(unfitted)} stage, because no "
                         "fitted measurement contains it")
    stage_counts = {"embedding": 1, "layer": shape.layers, "head": 1}
    seconds_by_stage: dict[str, float] = {}
    bytes_by_stage: dict[str, float] = {}
    messages_by_stage: dict[str, float] = {}
    for kind in kinds:
        rows = units.operators[kind]
        drivers = stage_drivers(kind, shape, seq)
        seconds = bytes_ = 0.0
        for name, (seconds_unit, bytes_unit) in rows.items():
            seconds_driver, bytes_driver = operator_drivers(kind, name)
            seconds += seconds_unit * drivers[seconds_driver]
            bytes_ += bytes_unit * drivers[bytes_driver]
        seconds_by_stage[kind] = seconds * stage_counts[kind]
        bytes_by_stage[kind] = bytes_ * stage_counts[kind]
        messages_by_stage[kind] = units.messages_per_stage[kind] * stage_counts[kind]
    return Projection(shape, seq, sum(seconds_by_stage.values()), sum(bytes_by_stage.values()),
                      sum(messages_by_stage.values()), bytes_by_stage, seconds_by_stage,
                      messages_by_stage)


@dataclass(frozen=True)
class CheckResult:
    """Projection error on one measured configuration left out of the fit."""

    held_out: tuple[str, int]
    fitted_on: tuple[tuple[str, int], ...]
    # Stage kinds compared: those that the held-out and the fitted measurements both contain.
    stages: tuple[str, ...]
    seconds_error: float  # (projected - measured) / measured
    bytes_error: float
    messages_error: float
    # Seconds, bytes and messages of one query over ``stages``. Measured figures are the mean
    # over the held-out configuration's queries.
    projected: dict[str, float]
    measured: dict[str, float]


def _relative_error(projected: float, measured: float) -> float:
    return (projected - measured) / measured if measured else math.nan


def _measured_over(group: list[Measurement], kinds: tuple[str, ...]) -> dict[str, float]:
    """Return the mean seconds, bytes and messages of ``group`` over the stage ``kinds``."""
    return {
        metric: sum(getattr(m.stages[kind], metric) for m in group for kind in kinds) / len(group)
        for metric in ("seconds", "bytes", "messages")
    }


def self_check(measurements: list[Measurement]) -> list[CheckResult]:
    """Leave out each measured configuration in turn, fit on the others and project it.

    Returns an empty list when fewer than two configurations (model, sequence length) exist.
    Each check compares only the stage kinds that the left-out configuration and the fitted
    ones both contain, e.g. the layers alone when a bench record ran without the embedding.
    """
    groups: dict[tuple[str, int], list[Measurement]] = {}
    for measurement in measurements:
        groups.setdefault(measurement.configuration, []).append(measurement)
    if len(groups) < 2:
        return []
    results = []
    for held_out, group in groups.items():
        fit_on = [m for key, rows in groups.items() if key != held_out for m in rows]
        units = fit_unit_costs(fit_on)
        kinds = tuple(kind for kind in units.stage_kinds
                      if all(kind in m.stages for m in group))
        projection = project(units, group[0].shape, group[0].seq, kinds)
        projected = {"seconds": projection.seconds, "bytes": projection.bytes,
                     "messages": projection.messages}
        measured = _measured_over(group, kinds)
        results.append(CheckResult(
            held_out=held_out,
            fitted_on=tuple(key for key in groups if key != held_out),
            stages=kinds,
            seconds_error=_relative_error(projected["seconds"], measured["seconds"]),
            bytes_error=_relative_error(projected["bytes"], measured["bytes"]),
            messages_error=_relative_error(projected["messages"], measured["messages"]),
            projected=projected,
            measured=measured,
        ))
    return results


# ---------------------------------------------------------------------------------------------
# Report


def _format_bandwidth(bit_s: float) -> str:
    if bit_s >= 1e9:
        return f"{bit_s / 1e9:g} Gbit/s"
    return f"{bit_s / 1e6:g} Mbit/s"


DURATION_UNITS = {
    "en": ("s", "min", "h", "days"),
    "ja": ("秒", "分", "時間", "日"),
}


def format_duration(seconds: float, lang: str = "en") -> str:
    """Seconds as seconds, minutes, hours or days with three significant digits."""
    second, minute, hour, day = DURATION_UNITS[lang]
    for limit, unit, size in ((120, second, 1), (7200, minute, 60), (172800, hour, 3600)):
        if seconds < limit:
            return f"{seconds / size:.3g} {unit}"
    days = seconds / 86400
    return f"{days:.3g} {day}" if days < 1000 else f"{days:,.0f} {day}"


def format_size(count: float) -> str:
    """Bytes in decimal units (kB, MB, GB, TB) with three significant digits."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if count < 1000:
            return f"{count:.3g} {unit}"
        if unit == "TB":
            return f"{count:,.0f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def _format_error(error: float) -> str:
    return f"{error * 100:+.1f}%"


TEXT = {
    "en": {
        "title": "Cost estimate: private inference with CHEETAH (SPU 0.9.5)",
        "question": "## Question",
        "question_body": "What would one private query of **{model}** at **{seq} tokens** cost "
                         "(time and traffic between client and server), and what would 1,000 "
                         "queries cost, on each network?",
        "answer": "## Answer",
        "answer_body": "On **{network}**: **{time} per query** and **{traffic}** of traffic. "
                       "1,000 queries take **{time_1000}** and move **{traffic_1000}**.",
        "columns": ("network", "per query: time", "per query: traffic", "1,000 queries: time",
                    "1,000 queries: traffic", "compute / transfer / latency"),
        "target": "Target: {model}. Operator plan {plan}, as measured.",
        "stages": "Traffic by stage: embedding {embedding}, layers {layer}, head {head}.",
        "chart": "Chart: `{chart}`.",
        "check": "## Self-check",
        "check_body": "Unit costs fitted on {fitted}, projected to {held_out} and compared "
                      "with its measurement over the {stages}: compute time {seconds}, traffic "
                      "{bytes}, messages {messages}.",
        "check_note": "Traffic and messages do not depend on the load of the measuring machine. "
                      "Compute time does: the load average of each source is listed below "
                      "where its file records it.",
        "check_pending": "Pending a second measurement. All measurements share one "
                         "configuration ({config}), so no configuration is left to check the "
                         "projection against, and no projection error can be given yet. Measure "
                         "another sequence length or model size and pass both files.",
        "assumptions": "## Assumptions",
        "sources": "## Source measurements",
        "stage_names": {"embedding": "embedding", "layer": "layers", "head": "head"},
        "query_of": " (query {number} of {total})",
        "setup_note": " The first query of its session: it also pays the OT and HE set-up.",
        "source_row": "`{path}`{query}: {model}, {seq} tokens, plan {plan}; {seconds} and "
                      "{traffic} per query, {messages:,} messages; machine: {machine}.{setup}",
        "estimate_note": "All figures are estimates projected from the measurements below.",
        "as_measured": "as measured",
        "machine_unknown": "not recorded in the file (pass --source-machine)",
        "engine": "SPU settings of the measurements: {engine}.",
        "engine_unknown": "not recorded in the files",
        "engine_partly": " {missing} of {total} measurements do not record them.",
        "lsb_note": " With `mul_lsb_error` on, products of two secrets move fewer bytes than "
                    "with today's default (off), so the traffic of a query under the default "
                    "is higher than projected here.",
    },
    "ja": {
        "title": "コスト見積もり: CHEETAH による秘匿推論 (SPU 0.9.5)",
        "question": "## 問い",
        "question_body": "**{model}** に **{seq} トークン** の秘匿クエリを 1 件送ると、"
                         "クライアントとサーバーの間でどれだけの時間と通信量がかかるか。"
                         "1,000 件ではどうか。ネットワークごとに見積もる。",
        "answer": "## 答え",
        "answer_body": "**{network}** では 1 クエリあたり **{time}**、通信量 **{traffic}**。"
                       "1,000 クエリで **{time_1000}**、通信量 **{traffic_1000}**。",
        "columns": ("ネットワーク", "1 クエリ: 時間", "1 クエリ: 通信量", "1,000 クエリ: 時間",
                    "1,000 クエリ: 通信量", "計算 / 転送 / 遅延"),
        "target": "対象: {model}。演算子プラン {plan} (計測時と同じ)。",
        "stages": "段階別の通信量: 埋め込み {embedding}、全レイヤー {layer}、ヘッド {head}。",
        "chart": "グラフ: `{chart}`。",
        "check": "## 自己検証",
        "check_body": "{fitted} で単位コストを求め、{held_out} へ外挿して実測と比べた誤差 "
                      "({stages}について): 計算時間 {seconds}、通信量 {bytes}、メッセージ数 "
                      "{messages}。",
        "check_note": "通信量とメッセージ数は計測マシンの負荷によらない。計算時間は負荷に"
                      "左右される: ファイルに記録がある場合、各計測の負荷平均を下に示す。",
        "check_pending": "2 つ目の計測待ち。すべての計測が同じ構成 ({config}) のため、"
                         "外挿を照合できる構成が残っておらず、誤差はまだ示せない。"
                         "別の系列長かモデルサイズで計測し、両方のファイルを渡すこと。",
        "assumptions": "## 前提",
        "sources": "## 元になった計測",
        "stage_names": {"embedding": "埋め込み", "layer": "レイヤー", "head": "ヘッド"},
        "query_of": " ({total} 件中 {number} 件目のクエリ)",
        "setup_note": " セッションの最初のクエリのため、OT と HE の準備のコストも含む。",
        "source_row": "`{path}`{query}: {model}、{seq} トークン、プラン {plan}。1 クエリあたり "
                      "{seconds}、{traffic}、メッセージ {messages:,} 件。マシン: {machine}。"
                      "{setup}",
        "estimate_note": "数値はすべて下記の計測から外挿した見積もり。",
        "as_measured": "計測どおり",
        "machine_unknown": "ファイルに記録なし (--source-machine で指定)",
        "engine": "計測時の SPU 設定: {engine}。",
        "engine_unknown": "ファイルに記録なし",
        "engine_partly": " {total} 件中 {missing} 件の計測には記録がない。",
        "lsb_note": " `mul_lsb_error` が有効な計測では、秘密値どうしの積の通信量が現在の既定 "
                    "(無効) より少ない。そのため既定の設定でのクエリの通信量は、ここでの見積もりより"
                    "多くなる。",
    },
}

NETWORK_NAMES = {
    "en": {"loopback": "loopback", "lan": "LAN", "wan": "WAN", "custom": "custom"},
    "ja": {"loopback": "ループバック", "lan": "LAN", "wan": "WAN", "custom": "指定値"},
}


@dataclass
class Estimate:
    """Everything the report shows, computed once so every language prints the same numbers."""

    projection: Projection
    plan: str
    networks: list[Network]
    chosen: Network
    checks: list[CheckResult]
    measurements: list[Measurement]

    def row(self, network: Network, lang: str = "en") -> dict[str, str]:
        per_query = self.projection.time_s(network)
        return {
            "time": format_duration(per_query, lang),
            "traffic": format_size(self.projection.bytes),
            "time_1000": format_duration(per_query * 1000, lang),
            "traffic_1000": format_size(self.projection.bytes * 1000),
            "split": " / ".join(format_duration(part, lang) for part in (
                self.projection.seconds, self.projection.transfer_s(network),
                self.projection.latency_s(network))),
        }

    def to_dict(self) -> dict:
        return {
            "target": self.projection.shape.describe(),
            "seq_len": self.projection.seq,
            "plan": self.plan,
            "network": self.chosen.name,
            "compute_s": self.projection.seconds,
            "bytes": self.projection.bytes,
            "rounds": self.projection.rounds,
            "per_network": {
                network.name: {"time_s": self.projection.time_s(network),
                               "transfer_s": self.projection.transfer_s(network),
                               "latency_s": self.projection.latency_s(network)}
                for network in self.networks
            },
            "self_check": [
                {"held_out": list(check.held_out), "fitted_on": [list(k) for k in check.fitted_on],
                 "stages": list(check.stages),
                 "seconds_error": check.seconds_error, "bytes_error": check.bytes_error,
                 "messages_error": check.messages_error,
                 "projected": check.projected, "measured": check.measured}
                for check in self.checks
            ],
            "sources": [
                {"path": str(m.path), "query": list(m.query) if m.query else None,
                 "model": m.shape.name, "seq_len": m.seq, "plan": m.plan, "machine": m.machine,
                 "includes_setup": m.includes_setup, "engine": m.engine}
                for m in self.measurements
            ],
            "assumptions": list(ASSUMPTIONS["en"]),
        }


def _join_names(names: list[str], lang: str) -> str:
    """Join ``names`` as a list in running text: "a, b and c", or "a、b、c" in Japanese."""
    if lang == "ja":
        return "、".join(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _configuration_label(key: tuple[str, int]) -> str:
    return f"{key[0]} @ {key[1]}"


def render_markdown(estimate: Estimate, lang: str, chart_name: str) -> str:
    """Render the one-page report in ``lang`` (en or ja)."""
    text, names = TEXT[lang], NETWORK_NAMES[lang]
    projection = estimate.projection
    chosen = estimate.row(estimate.chosen, lang)
    lines = [
        f"# {text['title']}",
        "",
        text["estimate_note"],
        "",
        text["question"],
        "",
        text["question_body"].format(model=projection.shape.name, seq=projection.seq),
        "",
        text["answer"],
        "",
        text["answer_body"].format(network=names[estimate.chosen.name], **chosen),
        "",
        "| " + " | ".join(text["columns"]) + " |",
        "|" + "---|" * len(text["columns"]),
    ]
    for network in estimate.networks:
        row = estimate.row(network, lang)
        detail = text["as_measured"] if math.isinf(network.bandwidth_bit_s) else (
            network.describe())
        label = f"{names[network.name]} ({detail})"
        if network is estimate.chosen:
            label = f"**{label}**"
        lines.append(f"| {label} | {row['time']} | {row['traffic']} | {row['time_1000']} | "
                     f"{row['traffic_1000']} | {row['split']} |")

    stages = {kind: format_size(value) for kind, value in projection.bytes_by_stage.items()}
    lines += [
        "",
        text["target"].format(model=projection.shape.describe(lang), plan=estimate.plan),
        text["stages"].format(**stages),
        text["chart"].format(chart=chart_name),
        "",
        text["check"],
        "",
    ]
    if estimate.checks:
        for check in estimate.checks:
            fitted = _join_names([_configuration_label(key) for key in check.fitted_on], lang)
            stages = _join_names([text["stage_names"][kind] for kind in check.stages], lang)
            lines.append("- " + text["check_body"].format(
                fitted=fitted, held_out=_configuration_label(check.held_out), stages=stages,
                seconds=_format_error(check.seconds_error), bytes=_format_error(check.bytes_error),
                messages=_format_error(check.messages_error)))
        lines += ["", text["check_note"]]
    else:
        config = _configuration_label(estimate.measurements[0].configuration)
        lines.append(text["check_pending"].format(config=config))

    lines += ["", text["assumptions"], ""]
    for number, assumption in enumerate(ASSUMPTIONS[lang], start=1):
        lines.append(f"{number}. {assumption}")

    lines += ["", text["sources"], ""]
    engine = engine_summary(estimate.measurements)
    missing = sum(m.engine is None for m in estimate.measurements)
    described = (text["engine_unknown"] if engine is None else
                 ", ".join(f"{key} {value}" for key, value in sorted(engine.items())))
    line = text["engine"].format(engine=described)
    if engine is not None and missing:
        line += text["engine_partly"].format(missing=missing, total=len(estimate.measurements))
    if engine is not None and engine.get("mul_lsb_error"):
        line += text["lsb_note"]
    lines += [line, ""]
    for measurement in estimate.measurements:
        query = "" if measurement.query is None else text["query_of"].format(
            number=measurement.query[0], total=measurement.query[1])
        lines.append("- " + text["source_row"].format(
            path=measurement.path.name, query=query, model=measurement.shape.name,
            seq=measurement.seq, plan=measurement.plan,
            seconds=format_duration(measurement.seconds, lang),
            traffic=format_size(measurement.bytes), messages=int(measurement.messages),
            machine=measurement.describe_machine(lang) or text["machine_unknown"],
            setup=text["setup_note"] if measurement.includes_setup else ""))
    return "\n".join(lines) + "\n"


def write_chart(path: Path, estimate: Estimate) -> None:
    """Draw a stacked bar chart of the time per query on each network. Its labels are in
    English, because a Japanese font may be missing."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    projection = estimate.projection
    labels = [network.name for network in estimate.networks]
    parts = {
        "compute (measured, scaled)": [projection.seconds for _ in estimate.networks],
        "transfer (bytes / bandwidth)": [projection.transfer_s(n) for n in estimate.networks],
        "latency (rounds x RTT)": [projection.latency_s(n) for n in estimate.networks],
    }
    figure = Figure(figsize=(7, 4), dpi=120)
    axes = figure.add_subplot()
    bottom = [0.0] * len(labels)
    for name, values in parts.items():
        axes.bar(labels, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for index, total in enumerate(bottom):
        axes.annotate(format_duration(total), (index, total), ha="center", va="bottom")
    axes.set_ylabel("seconds per query (estimate)")
    axes.set_title(f"{projection.shape.name}, {projection.seq} tokens, plan {estimate.plan}: "
                   f"{format_size(projection.bytes)} per query")
    axes.legend(loc="upper left")
    axes.set_ylim(0, max(bottom) * 1.2)
    figure.tight_layout()
    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png"))


def select_plan(measurements: list[Measurement], plan: str | None) -> list[Measurement]:
    """Keep the measurements of ``plan``. Without one, the inputs must contain a single plan."""
    plans = sorted({m.plan for m in measurements})
    if plan is None:
        if len(plans) > 1:
            raise ValueError(f"the measurements contain the operator plans {', '.join(plans)}; "
                             "choose one with --plan")
        return measurements
    selected = [m for m in measurements if m.plan == plan]
    if not selected:
        raise ValueError(f"no measurement of plan {plan!r}; the inputs contain "
                         f"{', '.join(plans)}")
    return selected


def build_estimate(measurements: list[Measurement], target: ModelShape, seq: int,
                   chosen: Network) -> Estimate:
    """Fit on every measurement, project to ``target``, and run the self-check."""
    plans = {m.plan for m in measurements}
    if len(plans) > 1:
        raise ValueError(f"measurements mix operator plans {sorted(plans)}; fit one plan at a "
                         "time")
    check_engines(measurements)
    units = fit_unit_costs(measurements)
    missing = [kind for kind in STAGE_KINDS if kind not in units.stage_kinds]
    if missing:
        raise ValueError(
            f"no measurement contains the {' or '.join(missing)} stage, so the estimate would "
            "leave it out; add a measurement of a whole model (demo or classify --json cost "
            "files, or a bench record run with --embedding --head)")
    networks = list(NETWORK_PRESETS.values())
    if chosen.name not in NETWORK_PRESETS:
        networks.append(chosen)
    else:
        chosen = NETWORK_PRESETS[chosen.name]
    return Estimate(projection=project(units, target, seq), plan=plans.pop(), networks=networks,
                    chosen=chosen, checks=self_check(measurements), measurements=measurements)


def write_report(estimate: Estimate, out_dir: Path, lang: str) -> list[Path]:
    """Write the Markdown page, the PNG chart and the numbers as JSON under ``out_dir``."""
    if lang not in TEXT:
        raise ValueError(f"unknown language {lang!r}; valid: {', '.join(TEXT)}")
    out_dir = Path(out_dir)
    chart = out_dir / "estimate.png"
    page = out_dir / ("estimate.md" if lang == "en" else f"estimate.{lang}.md")
    numbers = out_dir / "estimate.json"
    write_chart(chart, estimate)
    write_text_atomically(page, render_markdown(estimate, lang, chart.name))
    write_text_atomically(numbers, json.dumps(estimate.to_dict(), indent=2) + "\n")
    return [page, chart, numbers]


# ---------------------------------------------------------------------------------------------
# Command line


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``estimate`` command to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "estimate", help="project measured query costs to another model, length and network",
        description="Write a one-page cost estimate (Markdown, PNG chart, JSON) from measured "
                    "queries: cost files that classify --json or demo wrote, demo reports, or "
                    "bench records.")
    parser.add_argument("--measured", type=Path, nargs="+", required=True, metavar="FILE",
                        help="measured queries: cost JSON files (demo-query-N.json, classify "
                             "--json), demo-report.json files, or records of cipherprompt bench "
                             "run on --network loopback, which state their own model, sequence "
                             "length, plans and machine")
    parser.add_argument("--source-model", default="minilm-l6",
                        help="model that the cost files and demo reports were measured on "
                             f"(bench records state theirs): {', '.join(MODEL_PRESETS)}")
    parser.add_argument("--source-seq-len", type=int, default=32,
                        help="sequence length (tokens) of the files without a max_len field")
    parser.add_argument("--source-plan", default="exact",
                        help="operator plan of the files without a plan field")
    parser.add_argument("--plan", default=None,
                        help="operator plan to fit and project, e.g. exact or friendly; needed "
                             "when the inputs contain several plans (a bench record usually "
                             "does)")
    parser.add_argument("--source-machine",
                        help="description of the machine that measured the cost files and "
                             "demo reports (bench records state theirs)")

    parser.add_argument("--model", default="bert-base",
                        help=f"target model: {', '.join(MODEL_PRESETS)} or custom")
    for name in ("hidden", "heads", "kv-heads", "ffn", "layers", "vocab"):
        parser.add_argument(f"--{name}", type=int, help=f"{name} of --model custom")
    parser.add_argument("--gated-ffn", action="store_true",
                        help="--model custom has a gated (SwiGLU) FFN")

    parser.add_argument("--seq-len", type=int, default=128, help="target sequence length (tokens)")
    parser.add_argument("--network", default="wan",
                        help=f"network of the headline figure: {', '.join(NETWORK_PRESETS)} "
                             "or custom (the table lists every preset)")
    parser.add_argument("--bandwidth-mbit", type=float,
                        help="bandwidth of --network custom in Mbit/s")
    parser.add_argument("--rtt-ms", type=float,
                        help="round-trip time of --network custom in milliseconds")

    parser.add_argument("--lang", default="en", choices=sorted(TEXT), help="report language")
    parser.add_argument("--out", type=Path, default=Path("cipherprompt-work/estimate"),
                        help="output directory")
    parser.set_defaults(handler=cmd_estimate)
    return parser


def _target_shape(args) -> ModelShape:
    if args.model != "custom":
        return model_preset(args.model)
    values = {name: getattr(args, name) for name in ("hidden", "heads", "kv_heads", "ffn",
                                                      "layers", "vocab")}
    if values["kv_heads"] is None:
        values["kv_heads"] = values["heads"]
    missing = [f"--{name.replace('_', '-')}" for name, value in values.items() if value is None]
    if missing:
        raise ValueError(f"--model custom needs {', '.join(missing)}")
    return ModelShape("custom", gated_ffn=args.gated_ffn, **values)


def cmd_estimate(args) -> int:
    """Handler of ``cipherprompt estimate``: validate, fit, project and write the report."""
    target = _target_shape(args)
    if args.seq_len <= 0:
        raise ValueError(f"--seq-len must be positive, got {args.seq_len}")
    if args.network == "custom":
        network = custom_network(args.bandwidth_mbit, args.rtt_ms)
    else:
        network = network_preset(args.network)
    source = model_preset(args.source_model)
    measurements = [
        measurement
        for path in args.measured
        for measurement in load_measurements(path, source, args.source_seq_len, args.source_plan,
                                             args.source_machine)
    ]
    measurements = select_plan(measurements, args.plan)
    estimate = build_estimate(measurements, target, args.seq_len, network)
    written = write_report(estimate, args.out, args.lang)
    row = estimate.row(estimate.chosen)
    print(f"{target.name} at {args.seq_len} tokens on {network.name}: {row['time']} and "
          f"{row['traffic']} per query (estimate); report {written[0]}")
    return 0
