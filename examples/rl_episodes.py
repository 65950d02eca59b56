"""Reinforcement learning by episodes, killsafe from the next episode.

A DQN-style agent (a linear Q-function over features, trained with numpy)
learns a noisy corridor task from a replay buffer of numpy arrays. One step is
one episode; a checkpoint every ``--save-every`` episodes holds the agent,
its optimizer moments, the replay buffer (arrays, position and fill) and the
exploration schedule. The randomness of an episode is drawn from a generator
seeded by ``(seed, episode)``, so a resumed run replays nothing and draws
exactly what an uninterrupted run draws::

    python examples/rl_episodes.py --dir runs/rl --save-every 20

The last line printed is ``result: ...``: the same for an uninterrupted run and
for one stopped (Ctrl+C, SIGTERM, SIGKILL) and resumed with the same ``--dir``.
``--small`` or ``KILLSAFE_EXAMPLE_SMALL=1`` runs a tiny version.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from typing import Any

import numpy as np

import killsafe

N_STATES = 24
N_ACTIONS = 2  # left, right


class Corridor:
    """Walk right to the goal; slipping moves you the other way; each step costs a little."""

    def __init__(self, length: int, slip: float) -> None:
        self.length = length
        self.slip = slip

    def features(self, position: int) -> np.ndarray:
        x = np.zeros(N_STATES, dtype=np.float32)
        x[min(position, N_STATES - 1)] = 1.0
        return x

    def step(self, position: int, action: int, rng: np.random.Generator) -> tuple[int, float, bool]:
        move = 1 if action == 1 else -1
        if rng.random() < self.slip:
            move = -move
        position = max(0, position + move)
        done = position >= self.length - 1
        return position, (1.0 if done else -0.01), done


class ReplayBuffer:
    """A ring buffer of transitions in preallocated numpy arrays."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.obs = np.zeros((capacity, N_STATES), dtype=np.float32)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.next_obs = np.zeros((capacity, N_STATES), dtype=np.float32)
        self.dones = np.zeros(capacity, dtype=np.bool_)
        self.position = 0
        self.size = 0

    def add(self, obs: np.ndarray, action: int, reward: float, nxt: np.ndarray, done: bool) -> None:
        i = self.position
        self.obs[i], self.actions[i], self.rewards[i] = obs, action, reward
        self.next_obs[i], self.dones[i] = nxt, done
        self.position = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        idx = rng.integers(0, self.size, size=n)
        return (
            self.obs[idx],
            self.actions[idx],
            self.rewards[idx],
            self.next_obs[idx],
            self.dones[idx],
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "obs": self.obs,
            "actions": self.actions,
            "rewards": self.rewards,
            "next_obs": self.next_obs,
            "dones": self.dones,
            "position": self.position,
            "size": self.size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("obs", "actions", "rewards", "next_obs", "dones"):
            getattr(self, name)[...] = np.asarray(state[name])
        self.position = int(state["position"])
        self.size = int(state["size"])

    def digest(self) -> str:
        h = hashlib.sha256()
        for array in (self.obs, self.actions, self.rewards, self.next_obs, self.dones):
            h.update(array.tobytes())
        h.update(f"{self.position},{self.size}".encode())
        return h.hexdigest()[:16]


class Agent:
    """A linear Q-function with a target copy, trained by Adam on TD errors."""

    def __init__(self, lr: float = 0.05, gamma: float = 0.97) -> None:
        self.lr, self.gamma = lr, gamma
        self.weights = np.zeros((N_STATES, N_ACTIONS), dtype=np.float64)
        self.target = self.weights.copy()
        self.m = np.zeros_like(self.weights)
        self.v = np.zeros_like(self.weights)
        self.updates = 0

    def act(self, obs: np.ndarray, epsilon: float, rng: np.random.Generator) -> int:
        if rng.random() < epsilon:
            return int(rng.integers(N_ACTIONS))
        return int(np.argmax(obs @ self.weights))

    def learn(self, batch: tuple[np.ndarray, ...]) -> float:
        obs, actions, rewards, nxt, dones = batch
        target = rewards + self.gamma * (1.0 - dones) * (nxt @ self.target).max(axis=1)
        q = (obs @ self.weights)[np.arange(len(actions)), actions]
        error = q - target
        grad = np.zeros_like(self.weights)
        np.add.at(grad.T, actions, error[:, None] * obs)
        grad /= len(actions)
        self.updates += 1
        self.m = 0.9 * self.m + 0.1 * grad
        self.v = 0.999 * self.v + 0.001 * grad**2
        m_hat = self.m / (1 - 0.9**self.updates)
        v_hat = self.v / (1 - 0.999**self.updates)
        self.weights -= self.lr * m_hat / (np.sqrt(v_hat) + 1e-8)
        if self.updates % 50 == 0:
            self.target = self.weights.copy()
        return float(np.mean(error**2))

    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": self.weights,
            "target": self.target,
            "m": self.m,
            "v": self.v,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("weights", "target", "m", "v"):
            setattr(self, name, np.array(state[name], dtype=np.float64))
        self.updates = int(state["updates"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    killsafe.add_arguments(parser, directory="runs/rl_episodes")
    parser.add_argument("--episodes", type=int, default=None)
    parser.add_argument("--small", action="store_true", help="a tiny run for tests")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    small = args.small or os.environ.get("KILLSAFE_EXAMPLE_SMALL") == "1"
    episodes = args.episodes or (150 if small else 2000)

    env = Corridor(length=12 if small else 16, slip=0.1)
    agent = Agent()
    buffer = ReplayBuffer(capacity=2000 if small else 50_000)
    stats = {"returns": 0.0, "solved": 0, "env_steps": 0}

    with killsafe.Run.from_args(
        args, total_steps=episodes, save_every_steps=10, keep_last=2, best=("return", "max")
    ) as run:
        run.track(agent=agent, buffer=buffer, stats=stats)
        for episode in run.steps():
            rng = np.random.default_rng([args.seed, episode])
            epsilon = max(0.05, 1.0 - episode / (0.6 * episodes))
            position, total, done, loss = 0, 0.0, False, 0.0
            for _ in range(4 * env.length):
                obs = env.features(position)
                action = agent.act(obs, epsilon, rng)
                position, reward, done = env.step(position, action, rng)
                buffer.add(obs, action, reward, env.features(position), done)
                total += reward
                stats["env_steps"] += 1
                if buffer.size >= 64:
                    loss = agent.learn(buffer.sample(32, rng))
                if done:
                    break
            stats["returns"] += total
            stats["solved"] += int(done)
            run.log(**{"return": total, "loss": loss, "epsilon": epsilon})
    if run.exit_reason != "finished":
        return
    digest = hashlib.sha256(agent.weights.tobytes()).hexdigest()[:16]
    print(
        f"result: episodes={episodes} solved={stats['solved']} "
        f"mean_return={stats['returns'] / episodes:.6f} env_steps={stats['env_steps']} "
        f"q_sha={digest} buffer_sha={buffer.digest()}",
        flush=True,
    )


if __name__ == "__main__":
    main()
