"""DiffusionBench leaderboard: results from nano-suite stores, eval CSV/JSONL files and the paper's own tables
(``results``), rank correlations between the ImageNet and text-to-image axes (``correlation``), and Markdown,
HTML and PNG output (``render``). ``nanogen report`` drives them."""
