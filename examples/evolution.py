"""NEAT-like neuroevolution whose generations survive any stop.

A population of small feed-forward networks (genomes of node and connection
genes, each connection with a global innovation number) evolves to solve
XOR, the classic NEAT benchmark: speciation by compatibility distance, fitness sharing inside
species, crossover aligned on innovation numbers, and mutations that perturb
weights, add connections and split connections with new nodes. One step is one
generation. Fitness is evaluated in a pool of worker processes, which is shut
down cleanly however the run stops: Ctrl+C or SIGTERM (the generation
finishes, a checkpoint is committed, the pool is closed and joined) and
SIGKILL of the parent (each worker asked the kernel for a signal when its
parent dies, and exits). The best genome of every generation is exported as
its own JSON file, written atomically, to ``DIR/best/gen-NNNNN.json``::

    python examples/evolution.py --dir runs/evo --workers 2

The last line printed is ``result: ...``: the same for an uninterrupted run and
for one stopped and resumed with the same ``--dir``. ``--small`` or
``KILLSAFE_EXAMPLE_SMALL=1`` runs a tiny version.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import math
import multiprocessing
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

import killsafe

N_INPUTS = 2  # plus one bias input
CASES = [((a, b), float(a ^ b)) for a in (0, 1) for b in (0, 1)]  # XOR
COMPAT_THRESHOLD = 1.5
PR_SET_PDEATHSIG = 1

Genome = dict[str, Any]  # {"id", "nodes": [[id, order]], "conns": [[innov, src, dst, w, on]]}


# -- worker processes -----------------------------------------------------------


def init_worker(parent: int) -> None:
    """Runs in each worker: leave stops to the parent, and die with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole group
    # A result sent after the parent died (before its death signal arrived)
    # ends the worker quietly instead of with a BrokenPipeError traceback.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def evaluate(genome: Genome) -> float:
    """Fitness: 4 minus the squared error over the XOR cases (pure, deterministic)."""
    order = {node: position for node, position in genome["nodes"]}
    incoming: dict[int, list[tuple[int, float]]] = {}
    for _, src, dst, weight, enabled in genome["conns"]:
        if enabled:
            incoming.setdefault(dst, []).append((src, weight))
    outputs = [n for n, p in genome["nodes"] if p == 1.0]
    error = 0.0
    for inputs, target in CASES:
        values = {i: float(v) for i, v in enumerate((*inputs, 1.0))}
        for node in sorted(order, key=lambda n: (order[n], n)):
            if order[node] == 0.0:
                continue
            total = sum(values.get(src, 0.0) * w for src, w in incoming.get(node, []))
            values[node] = 1.0 / (1.0 + math.exp(-4.9 * max(-60.0, min(60.0, total))))
        error += (values[outputs[0]] - target) ** 2
    return len(CASES) - error


# -- genomes --------------------------------------------------------------------


class Evolution:
    """Population, species and the innovation counter: everything a generation needs."""

    def __init__(self, population_size: int, seed: int) -> None:
        self.population_size = population_size
        self.seed = seed
        self.innovations: dict[str, int] = {}  # "src-dst" -> innovation number
        self.next_innovation = 0
        self.next_node = N_INPUTS + 2  # inputs, bias, one output
        self.next_genome = 0
        self.species: list[dict[str, Any]] = []  # {"id", "representative", "best", "stale"}
        self.next_species = 0
        rng = random.Random(seed)
        self.population = [self._initial_genome(rng) for _ in range(population_size)]

    def _initial_genome(self, rng: random.Random) -> Genome:
        output = N_INPUTS + 1
        nodes = [[i, 0.0] for i in range(N_INPUTS + 1)] + [[output, 1.0]]
        conns = [
            [self._innovation(i, output), i, output, rng.gauss(0, 1), True]
            for i in range(N_INPUTS + 1)
        ]
        return self._new_genome(nodes, conns)

    def _new_genome(self, nodes: list[list[Any]], conns: list[list[Any]]) -> Genome:
        self.next_genome += 1
        return {"id": self.next_genome, "nodes": nodes, "conns": sorted(conns)}

    def _innovation(self, src: int, dst: int) -> int:
        key = f"{src}-{dst}"
        if key not in self.innovations:
            self.innovations[key] = self.next_innovation
            self.next_innovation += 1
        return self.innovations[key]

    # -- one generation ---------------------------------------------------------

    def next_generation(self, fitness: list[float], generation: int) -> None:
        rng = random.Random(self.seed * 1_000_003 + generation)
        members = self._speciate(fitness)
        offspring_counts = self._allot(members, fitness)
        children: list[Genome] = []
        for specie, count in zip(self.species, offspring_counts, strict=True):
            ranked = sorted(members[specie["id"]], key=lambda i: (-fitness[i], i))
            if count and ranked:
                children.append(self.population[ranked[0]])  # elitism
            parents = ranked[: max(1, len(ranked) // 2)]
            for _ in range(count - 1):
                a, b = rng.choice(parents), rng.choice(parents)
                if fitness[b] > fitness[a]:
                    a, b = b, a
                children.append(self._mutate(self._crossover(a, b, rng), rng))
        self.population = children[: self.population_size]

    def _speciate(self, fitness: list[float]) -> dict[int, list[int]]:
        members: dict[int, list[int]] = {s["id"]: [] for s in self.species}
        for index, genome in enumerate(self.population):
            for specie in self.species:
                if distance(genome, specie["representative"]) < COMPAT_THRESHOLD:
                    members[specie["id"]].append(index)
                    break
            else:
                self.next_species += 1
                self.species.append(
                    {"id": self.next_species, "representative": genome, "best": -1.0, "stale": 0}
                )
                members[self.next_species] = [index]
        survivors = []
        for specie in self.species:
            indices = members[specie["id"]]
            if not indices:
                continue
            best = max(fitness[i] for i in indices)
            specie["stale"] = 0 if best > specie["best"] else specie["stale"] + 1
            specie["best"] = max(best, specie["best"])
            specie["representative"] = self.population[indices[0]]
            if specie["stale"] < 15 or best >= max(fitness):
                survivors.append(specie)
        self.species = survivors
        return members

    def _allot(self, members: dict[int, list[int]], fitness: list[float]) -> list[int]:
        shared = [
            sum(fitness[i] for i in members[s["id"]]) / len(members[s["id"]]) for s in self.species
        ]
        total = sum(shared) or 1.0
        counts = [max(1, int(self.population_size * f / total)) for f in shared]
        counts[shared.index(max(shared))] += self.population_size - sum(counts)
        return counts

    def _crossover(self, fitter: int, other: int, rng: random.Random) -> Genome:
        a, b = self.population[fitter], self.population[other]
        genes_b = {c[0]: c for c in b["conns"]}
        conns = [list(rng.choice((c, genes_b[c[0]])) if c[0] in genes_b else c) for c in a["conns"]]
        return {"id": 0, "nodes": [list(n) for n in a["nodes"]], "conns": conns}

    def _mutate(self, genome: Genome, rng: random.Random) -> Genome:
        conns, nodes = genome["conns"], genome["nodes"]
        for conn in conns:
            if rng.random() < 0.8:
                conn[3] += rng.gauss(0, 0.5) if rng.random() < 0.9 else rng.gauss(0, 1) - conn[3]
        order = {n: p for n, p in nodes}
        if rng.random() < 0.15:
            src, dst = rng.choice(nodes)[0], rng.choice(nodes)[0]
            existing = {(c[1], c[2]) for c in conns}
            if order[src] < order[dst] and (src, dst) not in existing:
                conns.append([self._innovation(src, dst), src, dst, rng.gauss(0, 1), True])
        if rng.random() < 0.08 and conns:
            conn = rng.choice([c for c in conns if c[4]] or conns)
            conn[4] = False
            key = f"node-{conn[0]}"
            if key not in self.innovations:
                self.innovations[key] = self.next_node
                self.next_node += 1
            node = self.innovations[key]
            if node not in order:
                nodes.append([node, (order[conn[1]] + order[conn[2]]) / 2])
                conns.append([self._innovation(conn[1], node), conn[1], node, 1.0, True])
                conns.append([self._innovation(node, conn[2]), node, conn[2], conn[3], True])
        return self._new_genome(nodes, conns)

    # -- Stateful -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "population_size": self.population_size,
            "seed": self.seed,
            "innovations": dict(self.innovations),
            "next_innovation": self.next_innovation,
            "next_node": self.next_node,
            "next_genome": self.next_genome,
            "species": json.loads(json.dumps(self.species)),
            "next_species": self.next_species,
            "population": json.loads(json.dumps(self.population)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # JSON round trip: tuples and lists alike become lists, as they were built.
        state = json.loads(json.dumps(state))
        for name, value in state.items():
            setattr(self, name, value)


def distance(a: Genome, b: Genome) -> float:
    """NEAT's compatibility distance: non-matching genes and mean weight difference."""
    wa = {c[0]: c[3] for c in a["conns"]}
    wb = {c[0]: c[3] for c in b["conns"]}
    matching = wa.keys() & wb.keys()
    n = max(len(wa), len(wb), 1)
    disjoint = len(wa.keys() ^ wb.keys())
    mean_diff = sum(abs(wa[k] - wb[k]) for k in matching) / len(matching) if matching else 0.0
    return disjoint / n + 0.4 * mean_diff


def export_genome(path: Path, genome: Genome, fitness: float) -> None:
    """Write the genome file atomically: a reader sees no file or the whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w") as f:
        json.dump({"fitness": fitness, "genome": genome}, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def genome_sha(genome: Genome) -> str:
    return hashlib.sha256(json.dumps(genome, sort_keys=True).encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    killsafe.add_arguments(parser, directory="runs/evolution")
    parser.add_argument("--generations", type=int, default=None)
    parser.add_argument("--population", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="a tiny run for tests")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    small = args.small or os.environ.get("KILLSAFE_EXAMPLE_SMALL") == "1"
    generations = args.generations or (20 if small else 300)
    evo = Evolution(args.population or (40 if small else 200), seed=args.seed)
    record = {"best_fitness": -1.0, "best_sha": "", "generation": -1}

    context = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
    with killsafe.Run.from_args(
        args, total_steps=generations, save_every_steps=5, best=("best_fitness", "max")
    ) as run:
        run.track(evolution=evo, record=record)
        best_dir = Path(run.directory) / "best"
        pool = context.Pool(args.workers, initializer=init_worker, initargs=(os.getpid(),))
        try:
            for generation in run.steps():
                fitness = pool.map(evaluate, evo.population, chunksize=8)
                best = max(range(len(fitness)), key=lambda i: (fitness[i], -i))
                export_genome(
                    best_dir / f"gen-{generation:05d}.json", evo.population[best], fitness[best]
                )
                if fitness[best] > record["best_fitness"]:
                    record.update(
                        best_fitness=fitness[best],
                        best_sha=genome_sha(evo.population[best]),
                        generation=generation,
                    )
                run.log(best_fitness=fitness[best], species=len(evo.species))
                evo.next_generation(fitness, generation)
        except BaseException:
            pool.terminate()  # an error or a forced exit: do not wait for queued work
            raise
        finally:
            pool.close()  # no new work; the workers exit once idle
            pool.join()
    if run.exit_reason != "finished":
        return
    print(
        f"result: generations={generations} best_fitness={record['best_fitness']:.6f} "
        f"best_generation={record['generation']} best_sha={record['best_sha']} "
        f"species={len(evo.species)} innovations={evo.next_innovation} "
        f"population_sha={genome_sha({'p': evo.population})}",
        flush=True,
    )


if __name__ == "__main__":
    main()
