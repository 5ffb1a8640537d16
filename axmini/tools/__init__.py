"""Tools that measure modularity: what giving a feature to N models costs, in axmini and in any git history.

- `loc` (which lines and files count), `fit` (growth laws with R^2), `git` (repository access, bare or shallow);
- history mode: `history` (one change, sorted by code structure), `catalogue/` (pinned peer commits, the paper's
  numbers), `history_report` (`axmini report history`);
- patch mode: `metrics` (what a patch changes in a config tree), `families` (targets), `patches` (sweeps and
  outcomes), `baseline` (the copy-per-class library), `modularity` (`axmini report modularity`);
- `plots`, `render` (figures, Markdown and HTML) and `cli` (the `axmini report` command).
"""
