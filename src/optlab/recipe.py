"""Recipes: several commands in a row, each a step whose sub-run lands in one directory.

A recipe is YAML: a default ``model`` (and ``seed``, ``device``, ``dtype``) and a list of
``steps``. A step is a job (``command`` plus that command's settings, as a run's
``config.yaml`` holds them; sections may be partial) with a ``name``; its ``model`` may name an
earlier step, whose run directory then is its input (``model: prune``). Each step writes
``OUT/<name>``; ``resume`` skips a finished step whose resolved job is unchanged. At the end,
``report.md`` and a self-contained ``report.html`` (plots embedded) compare the steps.

    model: default
    steps:
      - {name: dense, command: eval, tasks: {tasks: [ppl:wiki], limit: 20, seq_len: 512}}
      - {name: prune, command: prune, method: {type: wanda}, calib: {n: 16, seq_len: 512}}
      - {name: pruned, command: eval, model: prune, tasks: {tasks: [ppl:wiki], limit: 20}}
"""

from __future__ import annotations

import base64
import html
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

import optlab.commands  # noqa: F401  (registers the commands a recipe may name)
from optlab.audit.plots import bars
from optlab.core.files import read_json_object, read_text_file
from optlab.core.job import Job, get_command, load_job, run_job
from optlab.core.run import atomic_write, warn_stale_partials
from optlab.errors import OptlabError

log = logging.getLogger("optlab")

RECIPE_KEYS = ("model", "seed", "device", "dtype", "steps", "title")
RECIPE_FILE = "recipe.yaml"
SHIPPED = Path(__file__).parent / "recipes"  # recipes/ at the repository root links here


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def load_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe in a YAML file (or a shipped one by name, e.g. ``quickstart``), checked:
    known keys, named steps, unique names."""
    path = Path(path)
    if not path.is_file() and path.suffix == "" and (SHIPPED / f"{path}.yaml").is_file():
        path = SHIPPED / f"{path}.yaml"
    if not path.exists():
        raise OptlabError(f"recipe {str(path)!r} not found (no such file): a .yaml file, or a "
                          f"shipped recipe ({', '.join(shipped_recipes())})")  # fmt: skip
    text = read_text_file(path, "recipe")
    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise OptlabError(f"{path} is not readable YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(recipe, Mapping) or not isinstance(recipe.get("steps"), list):
        raise OptlabError(f"{path}: a recipe is a mapping with a list of steps")
    unknown = sorted(set(recipe) - set(RECIPE_KEYS))
    if unknown:
        raise OptlabError(f"{path}: unknown recipe key {unknown[0]!r} (known: "
                          f"{', '.join(RECIPE_KEYS)})")  # fmt: skip
    names: list[str] = []
    for number, step in enumerate(recipe["steps"], 1):
        if not isinstance(step, Mapping) or not step.get("name") or not step.get("command"):
            raise OptlabError(f"{path}: step {number} needs a name and a command")
        name = str(step["name"])
        if name in names or "/" in name or name.startswith("."):
            raise OptlabError(f"{path}: step name {name!r} is repeated or not a plain name")
        names.append(name)
    return dict(recipe)


def resolve_steps(recipe: Mapping[str, Any], out: Path) -> list[tuple[str, Job]]:
    """Each step's job, with the recipe's defaults and earlier steps' runs as inputs. Every
    step is validated here, before the first one runs."""
    defaults = {k: recipe[k] for k in ("model", "seed", "device", "dtype") if k in recipe}
    jobs: list[tuple[str, Job]] = []
    names = [str(step["name"]) for step in recipe["steps"]]
    for step in recipe["steps"]:
        name = str(step["name"])
        data = {**defaults, **{k: v for k, v in step.items() if k != "name"}}
        command = get_command(str(data["command"]))
        for item in command.inputs:  # an input naming an earlier step is that step's run
            value = data.get(item.name)
            if any(value == earlier for earlier, _ in jobs):
                data[item.name] = str(out / str(value))
            elif value in names and item.name in step:  # a later step (or itself): no run yet
                raise OptlabError(f"step {name!r}: {item.name}: {value!r} names a step that "
                                  "runs later (or this one); a step reads only earlier steps' "
                                  "runs, so move it after the step it reads")  # fmt: skip
        data = {k: v for k, v in data.items() if k != "model" or "model" in
                {i.name for i in command.inputs}}  # fmt: skip
        jobs.append((name, Job.from_dict(data, source=f"step {name!r}")))
    return jobs


def run_recipe(
    recipe: str | Path | Mapping[str, Any],
    out: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every step of ``recipe`` into ``out`` and write the combined reports.

    >>> run_recipe("recipes/quickstart.yaml", "runs/quickstart")["steps"]["prune"]["run"]
    'runs/quickstart/prune'
    """
    data = load_recipe(recipe) if not isinstance(recipe, Mapping) else dict(recipe)
    out = Path(out)
    steps = resolve_steps(data, out)
    _check_out(out, resume, force)
    warn_stale_partials(out.parent)  # the steps' own runs look inside out, not beside it
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / RECIPE_FILE, yaml.safe_dump(data, sort_keys=False))
    results: dict[str, Any] = {}
    ran: set[str] = set()  # steps run this time: a later step reading one must run too
    start = time.perf_counter()
    for number, (name, job) in enumerate(steps, 1):
        target = out / name
        reads = {Path(str(v)).name for v in job.inputs.values()
                 if str(v).startswith(str(out / ""))}  # fmt: skip
        if resume and not reads & ran and _finished_unchanged(target, job):
            log.info("step %d/%d: %s (%s) finished before, unchanged: skipped", number,
                     len(steps), name, job.command)  # fmt: skip
            results[name] = _saved(target, job)
            continue
        log.info("step %d/%d: %s (%s)", number, len(steps), name, job.command)
        step_start = time.perf_counter()
        result = run_job(job, target, force=force or resume, progress=progress)
        ran.add(name)
        seconds = time.perf_counter() - step_start
        results[name] = {"command": job.command, "metrics": result.metrics,
                         "run": str(target), "seconds": seconds}  # fmt: skip
    summary = {"steps": results, "seconds": time.perf_counter() - start}
    atomic_write(out / "report.md", recipe_report(data, results))
    atomic_write(out / "report.html", recipe_html(data, results))
    log.info("recipe written to %s (report: %s)", out, out / "report.html")
    return {**summary, "run": str(out), "report": str(out / "report.md")}


def _check_out(out: Path, resume: bool, force: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise OptlabError(f"--out {str(out)!r} exists and is a file, not a recipe run; choose "
                          "another --out")  # fmt: skip
    if not (out / RECIPE_FILE).is_file():
        raise OptlabError(f"{str(out)!r} exists and is not a recipe run; choose another --out")
    if not (resume or force):
        raise OptlabError(f"recipe run {str(out)!r} exists; pass --resume to continue it or "
                          "--force to run every step again")  # fmt: skip


def _finished_unchanged(target: Path, job: Job) -> bool:
    if not (target / "metrics.json").is_file():
        return False
    try:
        return load_job(target) == job
    except OptlabError:
        return False


def _saved(target: Path, job: Job) -> dict[str, Any]:
    metrics = read_json_object(target / "metrics.json", "step metrics")
    return {"command": job.command, "metrics": metrics, "run": str(target), "seconds": 0.0,
            "skipped": True}  # fmt: skip


def headline(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The comparable numbers of a step: perplexity, accuracies, sparsity, bits, size."""
    found: dict[str, float] = {}
    tasks = metrics.get("tasks", {})
    for task, values in tasks.items() if isinstance(tasks, Mapping) else ():
        if "perplexity" in values:
            found[f"{task} perplexity"] = values["perplexity"]
        if "acc" in values:
            found[f"{task} acc"] = values["acc"]
    for key in ("perplexity", "perplexity_after"):
        value = metrics.get(key)
        if isinstance(value, Mapping) and "perplexity" in value:
            found["ppl:wiki perplexity"] = value["perplexity"]
    sparsity = metrics.get("sparsity")
    if isinstance(sparsity, Mapping):
        found["sparsity"] = sparsity.get("total")
    for key in ("avg_bits", "effective_bits", "file_mb", "compression_vs_fp16"):
        if isinstance(metrics.get(key), int | float):
            found[key] = metrics[key]
    return {k: float(v) for k, v in found.items() if isinstance(v, int | float)}


def _columns(results: Mapping[str, Any]) -> list[str]:
    columns: list[str] = []
    for step in results.values():
        columns += [c for c in headline(step["metrics"]) if c not in columns]
    return columns


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def recipe_report(recipe: Mapping[str, Any], results: Mapping[str, Any]) -> str:
    """A Markdown table across the steps, then where each step's run is."""
    columns = _columns(results)
    lines = [f"# {recipe.get('title', 'optlab recipe')}", "",
             f"Model: `{recipe.get('model', '-')}`.", "",
             "| step | command | " + " | ".join(columns) + " | seconds |",
             "|---" * (len(columns) + 3) + "|"]  # fmt: skip
    for name, step in results.items():
        values = headline(step["metrics"])
        seconds = "skipped" if step.get("skipped") else f"{step['seconds']:.1f}"
        cells = [name, step["command"], *(_cell(values.get(c)) for c in columns), seconds]
        lines.append("| " + " | ".join(cells) + " |")
    lines += _samples_table(results)
    lines += ["", "Runs: " + ", ".join(f"`{Path(s['run']).name}/`" for s in results.values()),
              "", "Plots: `report.html` (each headline number across steps, and the steps' "
              "own plots)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _samples(results: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Generated completions per step (eval steps with a ``gen:`` task): step -> prompt."""
    found: dict[str, dict[str, str]] = {}
    for name, step in results.items():
        for values in step["metrics"].get("tasks", {}).values():
            if isinstance(values, Mapping) and isinstance(values.get("samples"), Mapping):
                found.setdefault(name, {}).update(values["samples"])
    return found


def _samples_table(results: Mapping[str, Any]) -> list[str]:
    samples = _samples(results)
    if not samples:
        return []
    prompts = list(dict.fromkeys(p for by_prompt in samples.values() for p in by_prompt))
    lines = ["", "| prompt | " + " | ".join(samples) + " |", "|---" * (len(samples) + 1) + "|"]
    for prompt in prompts:
        cells = [repr(samples[step].get(prompt, "-")).replace("|", "\\|") for step in samples]
        lines.append(f"| *{prompt}* | " + " | ".join(cells) + " |")
    return lines


def _plots(results: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    """One bar chart per headline number that two or more steps report, then each step's
    own PNG files (e.g. quantize's sensitivity.png)."""
    plots = []
    for column in _columns(results):
        steps = {n: headline(s["metrics"]).get(column) for n, s in results.items()}
        steps = {n: v for n, v in steps.items() if v is not None}
        if len(steps) >= 2:
            plots.append((column, bars(list(steps), list(steps.values()), column, column)))
    for name, step in results.items():
        for png in sorted(Path(step["run"]).glob("*.png")):
            plots.append((f"{name}: {png.name}", png.read_bytes()))
    return plots


def recipe_html(recipe: Mapping[str, Any], results: Mapping[str, Any]) -> str:
    """The report as one HTML file with its plots embedded (no files beside it needed)."""
    columns = _columns(results)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["step", "command", *columns, "seconds"])
    rows = []
    for name, step in results.items():
        values = headline(step["metrics"])
        seconds = "skipped" if step.get("skipped") else f"{step['seconds']:.1f}"
        cells = [name, step["command"], *(_cell(values.get(c)) for c in columns), seconds]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    samples = _samples(results)
    if samples:
        prompts = list(dict.fromkeys(p for by_prompt in samples.values() for p in by_prompt))
        head_s = "".join(f"<th>{html.escape(c)}</th>" for c in ["prompt", *samples])
        body_s = "".join(
            "<tr><td>" + html.escape(p) + "</td>"
            + "".join(f"<td>{html.escape(samples[s].get(p, '-'))}</td>" for s in samples)
            + "</tr>" for p in prompts)  # fmt: skip
        rows.append(f"</table><h2>Completions</h2><table><tr>{head_s}</tr>{body_s}")
    figures = "".join(
        f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,"
        f"{base64.b64encode(png).decode()}'><figcaption>{html.escape(title)}</figcaption>"
        "</figure>"
        for title, png in _plots(results)
    )
    title = html.escape(str(recipe.get("title", "optlab recipe")))
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "figure{display:inline-block;margin:1em}img{max-width:560px}")  # fmt: skip
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{style}</style></head><body><h1>{title}</h1>"
            f"<p>Model: <code>{html.escape(str(recipe.get('model', '-')))}</code></p>"
            f"<table><tr>{head}</tr>{''.join(rows)}</table>{figures}</body></html>\n")  # fmt: skip


def quickstart(
    out: str | Path,
    *,
    limit: int | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """The shipped quickstart recipe (``optlab demo``); ``limit`` caps every evaluation's
    perplexity windows (a quicker, rougher look)."""
    recipe = load_recipe("quickstart")
    if limit is not None:
        for step in recipe["steps"]:
            if step["command"] == "eval":
                step["tasks"] = {**step["tasks"], "limit": limit}
    return run_recipe(recipe, out, resume=resume, force=force, progress=progress)
