"""Plots of the examples (matplotlib, Agg backend: files only)."""

import pathlib
from collections.abc import Mapping, Sequence
from typing import Optional

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np

COLORS = plt.rcParams['axes.prop_cycle'].by_key()['color']


def _save(fig, path) -> str:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return str(path)


def selected_filters(
  epochs: Sequence[int],
  counts: Sequence[Mapping[str, Sequence[int]]],
  path,
  title: str = '',
) -> str:
  """Share of selected filters (groups) per layer along the path."""
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for i, layer in enumerate(counts[-1]):
    total = counts[-1][layer][1]
    share = [100 * c[layer][0] / total for c in counts]
    ax.plot(epochs, share, marker='.', color=COLORS[i % 10])
    ax.annotate(
      f'{layer}: {counts[-1][layer][0]}/{total}',
      (epochs[-1], share[-1]),
      textcoords='offset points',
      xytext=(-4, 4 if i % 2 else -11),
      ha='right',
      fontsize=9,
      color=COLORS[i % 10],
    )
  ax.set_xlabel('epoch')
  ax.set_ylabel('selected filters (% of the layer, Γ ≠ 0)')
  ax.set_ylim(-3, 103)
  ax.set_title(title or 'Selected filters per layer along the path')
  ax.grid(alpha=0.3)
  return _save(fig, path)


def norm_paths(
  epochs: Sequence[int],
  lbi: np.ndarray,
  sgd: Optional[np.ndarray],
  selected: np.ndarray,
  layer: str,
  path,
) -> str:
  """Filter-norm paths ‖W_filter‖ of one layer: DessiLBI next to SGD.

  ``lbi`` and ``sgd`` are (epochs + 1, filters) with the initial norms first;
  filters in Γ's support at the end are drawn in colour, the others grey.
  """
  panels = [('DessiLBI', lbi)] + (
    [('SGD with momentum', sgd)] if sgd is not None else []
  )
  fig, axes = plt.subplots(
    1, len(panels), figsize=(5.2 * len(panels), 4.2), sharey=True
  )
  axes = np.atleast_1d(axes)
  x = [0, *epochs]
  for ax, (name, norms) in zip(axes, panels, strict=True):
    for j in range(norms.shape[1]):
      if selected[j]:
        ax.plot(x, norms[:, j], lw=1.2, color=COLORS[j % 10])
      else:
        ax.plot(x, norms[:, j], lw=0.8, color='0.65', zorder=0)
    ax.set_xlabel('epoch')
    ax.set_title(f'{name}: {layer} filters')
    ax.grid(alpha=0.3)
  axes[0].set_ylabel('filter norm ‖W_filter‖₂')
  n = int(np.sum(selected))
  fig.suptitle(
    f'colour: the {n} of {len(selected)} filters that DessiLBI selects '
    f'(Γ ≠ 0 at the end); grey: the others',
    fontsize=10,
  )
  return _save(fig, path)


def accuracy_path(
  epochs: Sequence[int],
  curves: Mapping[str, Sequence[float]],
  path,
  share: Optional[Sequence[float]] = None,
  title: str = 'Test accuracy along the path',
) -> str:
  """Accuracy curves (dense W, W*, SGD...) along the path, optionally with
  the share of selected conv filters on a second axis."""
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  styles = ['-', '--', ':', '-.']
  for i, (name, acc) in enumerate(curves.items()):
    ax.plot(
      epochs,
      100 * np.asarray(acc),
      styles[i % 4],
      marker='.',
      color=COLORS[i],
      label=name,
    )
  ax.set_xlabel('epoch')
  ax.set_ylabel('test accuracy (%)')
  ax.set_ylim(0, 100)
  ax.grid(alpha=0.3)
  if share is not None:
    ax2 = ax.twinx()
    ax2.plot(epochs, 100 * np.asarray(share), color='0.5', lw=1, alpha=0.7)
    ax2.set_ylabel('conv filters in W* (%, grey)')
    ax2.set_ylim(0, 100)
  ax.legend(loc='center right', fontsize=9)
  ax.set_title(title)
  return _save(fig, path)


def pruning(
  fractions: Sequence[float],
  curves: Mapping[str, Sequence[float]],
  path,
  dense: Optional[float] = None,
  title: str = '',
) -> str:
  """Accuracy against the share of filters pruned, one line per method:
  dashed without fine-tuning, solid after it; a marker per method (methods
  that pick the same filters draw on top of each other)."""
  fig, ax = plt.subplots(figsize=(6.8, 4.4))
  x = 100 * np.asarray(fractions)
  methods = list(dict.fromkeys(name.rsplit(', ', 1)[0] for name in curves))
  markers = ['o', 's', '^', 'D', 'v']
  lows = []
  for name, values in curves.items():
    method = name.rsplit(', ', 1)[0]
    i = methods.index(method)
    tuned = not name.endswith('no fine-tune')
    acc = 100 * np.asarray(values)
    lows.append(acc.min())
    ax.plot(
      x,
      acc,
      '-' if tuned else '--',
      marker=markers[i % len(markers)],
      markersize=7 - 2 * i,
      color=COLORS[i],
      alpha=0.9,
      label=name,
    )
  if dense is not None:
    ax.axhline(100 * dense, color='k', lw=0.8, ls=':', label='dense, unpruned')
  ax.set_xlabel('filters pruned (%)')
  ax.set_ylabel('test accuracy (%)')
  ax.set_ylim(max(0, 10 * np.floor(min(lows) / 10) - 5), 100)
  ax.grid(alpha=0.3)
  ax.legend(loc='lower left', fontsize=8)
  ax.set_title(title)
  return _save(fig, path)


def bars(
  values: Mapping[str, float],
  path,
  ylabel: str,
  title: str = '',
  errors: Optional[Mapping[str, float]] = None,
  notes: Optional[Mapping[str, str]] = None,
) -> str:
  """One bar per entry, its value printed on top."""
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  names = list(values)
  y = [values[n] for n in names]
  err = [errors.get(n, 0.0) for n in names] if errors else None
  ax.bar(names, y, yerr=err, color=COLORS[: len(names)], capsize=4)
  for i, n in enumerate(names):
    label = f'{y[i]:.3g}' + (f'\n{notes[n]}' if notes and n in notes else '')
    ax.annotate(label, (i, y[i]), ha='center', va='bottom', fontsize=9)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.margins(y=0.2)
  ax.grid(alpha=0.3, axis='y')
  return _save(fig, path)
