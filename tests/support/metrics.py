"""Reading the metrics side of the docs for the tests: the Grafana dashboard's queries
(docs/grafana/smq.json) with the metric names they use, the metric table of
docs/metrics.md, and a scrape in Prometheus' text format.

The PromQL is parsed loosely, enough to find names: strings, label matchers, ranges,
grouping clauses and Grafana's $variables are dropped; a word followed by "(" is a
function (which must be one PromQL has); the other words, less PromQL's keywords, are
metric names.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from support import ROOT

DASHBOARD = ROOT / "docs" / "grafana" / "smq.json"
METRICS_MD = ROOT / "docs" / "metrics.md"

# PromQL's functions and aggregation operators (Prometheus 2.42), and its keywords.
FUNCTIONS = frozenset("""
    abs absent absent_over_time avg_over_time ceil changes clamp clamp_max clamp_min
    count_over_time day_of_month day_of_week day_of_year days_in_month delta deriv exp
    floor histogram_quantile holt_winters hour idelta increase irate label_join
    label_replace last_over_time ln log10 log2 max_over_time min_over_time minute month
    predict_linear present_over_time quantile_over_time rate resets round scalar sgn sort
    sort_desc sqrt stddev_over_time stdvar_over_time sum_over_time time timestamp vector
    year acos acosh asin asinh atan atanh cos cosh deg pi rad sin sinh tan tanh
    sum min max avg group stddev stdvar count count_values bottomk topk quantile
""".split())
KEYWORDS = frozenset("and or unless bool offset by without on ignoring group_left group_right "
                     "inf nan".split())
# Series Prometheus makes itself for every target, not found in a scrape.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
# What the tests put for Grafana's variables to run a panel's query in Prometheus.
VARIABLES = {"job": "smq", "instance": ".*", "topic": ".*", "__rate_interval": "1m",
             "__interval": "15s", "__range": "1h"}


@dataclass(frozen=True)
class Query:
    where: str  # the panel's title (and target) or the variable's name
    expr: str


def load_dashboard(path: Path = DASHBOARD) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def panels(dashboard: dict) -> list[dict]:
    """Every panel, those inside collapsed rows included."""
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def queries(dashboard: dict) -> list[Query]:
    """Every PromQL query: each panel target's expr, and each query variable's metric
    selector (label_values(SELECTOR, label) -> SELECTOR)."""
    found = [Query(f"{panel['title']} [{target.get('refId', '?')}]", target["expr"])
             for panel in panels(dashboard) for target in panel.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", text)
        assert match, f"variable {variable['name']}: not label_values(selector, label): {text}"
        found.append(Query(f"variable {variable['name']}", match.group(1)))
    return found


def substitute(expr: str, values: dict[str, str] = VARIABLES) -> str:
    """The expr with Grafana's $name / ${name} variables replaced by `values`."""
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"no test value for ${name} in {expr}"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def names_in(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, unknown functions) an expr uses, parsed loosely (module docstring)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', "", expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{\w+\}|\$\w+", " ", text)  # Grafana's variables
    text = re.sub(r"\boffset\s+\S+", " ", text)
    text = re.sub(r"(?<![\w:.])\d+(?:\.\d*)?(?:[eE][+-]?\d+)?", " ", text)  # numbers
    metrics, unknown = set(), set()
    for match in re.finditer(r"[A-Za-z_:][\w:]*", text):
        word = match.group()
        if re.match(r"\s*\(", text[match.end():]):
            if word not in FUNCTIONS:
                unknown.add(word)
        elif word.lower() not in KEYWORDS:
            metrics.add(word)
    return metrics, unknown


# -- a scrape -------------------------------------------------------------------------

@dataclass
class Family:
    name: str  # as its TYPE line names it (counters with _total, histograms without)
    type: str
    help: str
    labels: set[str]  # of its samples, less a histogram's `le`


def parse_scrape(text: str) -> tuple[set[str], dict[str, Family]]:
    """(every series name, the families by name) of a scrape in the text format."""
    series: set[str] = set()
    families: dict[str, Family] = {}
    helps: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[len("# HELP "):].partition(" ")
            helps[name] = help_text
        elif line.startswith("# TYPE "):
            name, kind = line[len("# TYPE "):].split()
            families[name] = Family(name, kind, helps.get(name, ""), set())
        elif line and not line.startswith("#"):
            name = re.match(r"[A-Za-z_:][\w:]*", line).group()
            series.add(name)
            family = families.get(name) or families.get(re.sub(r"_(bucket|sum|count)$", "", name))
            assert family is not None, f"a sample without its TYPE line: {line}"
            family.labels.update(re.findall(r"(\w+)=\"", line.split("}")[0]) if "{" in line else [])
    for family in families.values():
        family.labels.discard("le")
    return series, families


def documented_metrics(path: Path = METRICS_MD) -> dict[str, tuple[str, set[str]]]:
    """The metric table rows of docs/metrics.md (| `name` | type | `label`, ... | meaning |):
    {name: (type, labels)}. A metric in two rows is an error."""
    found: dict[str, tuple[str, set[str]]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\| `([a-z_:]+)` \| (counter|gauge|histogram) \| ([^|]*) \|", line)
        if not match:
            continue
        name, kind, labels = match.groups()
        assert name not in found, f"{name} documented twice"
        found[name] = (kind, set(re.findall(r"`(\w+)`", labels)))
    return found


def marked_block(marker: str, path: Path = METRICS_MD) -> str:
    """The YAML block that follows the comment `<!-- MARKER: ... -->`."""
    text = path.read_text(encoding="utf-8")
    match = re.search(rf"<!-- {marker}:[^>]*-->\n```yaml\n(.*?)^```", text, re.S | re.M)
    assert match, f"no {marker} block in {path.name}"
    return match.group(1)


def alert_rules(path: Path = METRICS_MD) -> str:
    return marked_block("alert rules", path)


def alert_queries(path: Path = METRICS_MD) -> list[Query]:
    """Each rule's expr in the alert rules block: one line, or a folded block (`>`)."""
    found = []
    for rule in re.split(r"(?m)^\s*- alert: ", alert_rules(path))[1:]:
        name = rule.split()[0]
        match = re.search(r"(?m)^(\s*)expr: (.*)$", rule)
        assert match, f"alert {name}: no expr"
        expr = match.group(2)
        if expr.strip() == ">":
            lines = re.match(r"(?:\n\s{%d,}.*)+" % (len(match.group(1)) + 1), rule[match.end():])
            assert lines, f"alert {name}: an empty folded expr"
            expr = " ".join(line.strip() for line in lines.group().splitlines() if line.strip())
        found.append(Query(f"alert {name}", expr))
    assert found, "no rules"
    return found
