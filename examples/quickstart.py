"""ascend in one minute, on the local backend (no cluster needed).

    python examples/quickstart.py

The same code runs on Kubernetes with ``ASCEND_BACKEND=kubernetes``.
"""

import asyncio
import math

import ascend


@ascend.remote(cpu=1, memory="512Mi", timeout=60)
def score(lr: float, depth: int) -> dict[str, float]:
    """Pretend to train a model and return its metrics."""
    loss = abs(math.log10(lr) + 3) + 1 / depth
    print(f"lr={lr:g} depth={depth} -> loss={loss:.3f}")
    return {"lr": lr, "depth": depth, "loss": loss}


@ascend.remote
def fragile(x: int) -> float:
    return 1 / x


def main() -> None:
    # One call: a future, returned at once.
    fut = score(3e-4, 4)
    print(fut)
    print("result:", fut.result())

    # A grid: one future for all, results in input order.
    grid = [(lr, depth) for lr in (1e-2, 1e-3, 1e-4) for depth in (2, 4, 8)]
    results = score.starmap(grid).result()
    best = min(results, key=lambda r: r["loss"])
    print(f"best of {len(results)}: {best}")

    # Remote exceptions keep their type.
    try:
        fragile(0).result()
    except ZeroDivisionError as exc:
        print("caught remote ZeroDivisionError:", exc)

    # The same futures are awaitable.
    async def concurrently() -> list[float]:
        return await asyncio.gather(fragile(2), fragile(4))

    print("awaited:", asyncio.run(concurrently()))


if __name__ == "__main__":
    main()
