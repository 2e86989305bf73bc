"""Text-to-image metrics (spec ``evaluation.md`` §3), one module per benchmark, each a metric object with
``name``, ``keys``, ``score`` (per-image contributions per key) and ``summarize`` (all-reduced sums -> reported
numbers). Scoring logic is pure; heavy models sit behind small backends so that it is tested on the CPU."""
