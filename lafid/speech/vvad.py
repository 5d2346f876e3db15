"""Optional learned visual speaking detector: the VVAD-LRS3 lip-landmark model.

`lipFeatureModel.h5` from the PyPI package `vvadlrs3` 0.2.0 maps 38 frames
(25 fps, about 1.5 s) of the 20 dlib lip points to a speaking probability:
TimeDistributed(Flatten) -> LSTM(32) -> BatchNorm -> Dense(512, relu) ->
Dense(1, sigmoid). Its Keras 2 weights are read with h5py and run in NumPy, so
neither TensorFlow nor the package's own code is needed (install it with
`pip install --no-deps vvadlrs3==0.2.0`, plus h5py). Input features follow the
package's preprocessing: points relative to the first frame's first lip point,
scaled by the window's largest absolute value. The face mesh's lip points stand
in for dlib's (`lafid.speech.mouth.LIP_POINTS`).

License: LGPL-2.1; trained on features from the iBUG 300-W landmark data, whose
license excludes commercial use. Off by default (`lip_detector: vvad` in a recipe).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

WINDOW = 38  # frames per decision
RATE = 25.0  # the frame rate the model was trained at (LRS3)


def model_path() -> Path:
    spec = importlib.util.find_spec("vvadlrs3")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("lip_detector 'vvad' needs the vvadlrs3 package: "
                                "pip install --no-deps vvadlrs3==0.2.0 h5py")
    return Path(spec.submodule_search_locations[0]) / "lipFeatureModel.h5"


def _hard_sigmoid(x: np.ndarray) -> np.ndarray:
    return np.clip(0.2 * x + 0.5, 0.0, 1.0)


class LipSpeakingModel:
    """The VVAD-LRS3 lip-feature network as NumPy arrays."""

    def __init__(self, path: Path | None = None):
        import h5py

        with h5py.File(path or model_path(), "r") as f:
            w = f["model_weights"]

            def get(layer: str, name: str) -> np.ndarray:
                return np.asarray(w[layer][layer][f"{name}:0"], dtype=np.float64)

            self.kernel, self.recurrent, self.bias = (get("lstm_1", n) for n in ("kernel", "recurrent_kernel", "bias"))
            self.bn = [get("batch_normalization_1", n) for n in ("gamma", "beta", "moving_mean", "moving_variance")]
            self.dense1 = (get("dense_1", "kernel"), get("dense_1", "bias"))
            self.dense2 = (get("dense_2", "kernel"), get("dense_2", "bias"))
        self.units = self.recurrent.shape[0]

    @staticmethod
    def features(lips: np.ndarray) -> np.ndarray:
        """(T, 20, 2) lip points in pixels -> the model's normalised input."""
        rel = lips - lips[0, 0]
        scale = np.abs(rel).max()
        return rel / scale if scale > 0 else rel

    def probability(self, lips: np.ndarray) -> float:
        """Speaking probability of one (WINDOW, 20, 2) window of lip points."""
        x = self.features(np.asarray(lips, dtype=np.float64)).reshape(len(lips), -1)
        n = self.units
        h, c = np.zeros(n), np.zeros(n)
        for xt in x:
            z = xt @ self.kernel + h @ self.recurrent + self.bias
            i, f = _hard_sigmoid(z[:n]), _hard_sigmoid(z[n:2 * n])
            c = f * c + i * np.tanh(z[2 * n:3 * n])
            h = _hard_sigmoid(z[3 * n:]) * np.tanh(c)
        gamma, beta, mean, var = self.bn
        y = (h - mean) / np.sqrt(var + 1e-3) * gamma + beta
        y = np.maximum(y @ self.dense1[0] + self.dense1[1], 0.0)
        return float(1.0 / (1.0 + np.exp(-(y @ self.dense2[0] + self.dense2[1])[0])))

    def speaking(self, t: np.ndarray, lips: list[np.ndarray | None]) -> float | None:
        """Mean speaking probability over WINDOW-frame windows (hop half a window) of a lip
        series resampled to 25 fps; None when no window has a face in every frame."""
        if len(t) < 2:
            return None
        grid = np.arange(t[0], t[-1], 1.0 / RATE)
        idx = np.abs(t[None, :] - grid[:, None]).argmin(axis=1)
        probs = []
        for start in range(0, len(grid) - WINDOW + 1, WINDOW // 2):
            window = [lips[i] for i in idx[start:start + WINDOW]]
            if all(w is not None for w in window):
                probs.append(self.probability(np.stack(window)))
        return float(np.mean(probs)) if probs else None
