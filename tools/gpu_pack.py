#!/usr/bin/env python
"""Prepare the GPU check's pack (run HERE, where ../shared and PyPI are): wheels, a shrunk copy of
the data, the Lite-S weights and the CPU reference result, in an ignored folder that the device
tool carries (`.carry/` by default; see yoloq/bench/gpu_pack.py for the layout).

    python tools/gpu_pack.py                       # .carry/: 500 val + all train images at 320 px, wheels, reference
    python tools/gpu_pack.py --no-wheels --val-images 8 --train-images 16 --out /tmp/pack \\
        -- --calib-images 8 --max-images 8          # a tiny pack (tests); args after -- go to the reference ptq run

The reference is `yoloq ptq --cfg yolov6lite_s --weights <pack>/weights/yolov6lite_s.pt --data
<pack>/data/data.yaml [--device cpu] [args after --]` on this CPU: the default Lite-S PTQ on the
packed data; tools/gpu_check.py runs the same arguments with --device cuda and compares.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from yoloq.bench import gpu_pack as gp            # noqa: E402
from yoloq.bench.cost_run import run_child         # noqa: E402

CHILD = "import sys; from yoloq.cli import console; sys.argv[0] = 'yoloq'; console()"


def build_parser():
    p = argparse.ArgumentParser(prog="tools/gpu_pack.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / ".carry",
                   help="the pack folder (default: %(default)s; emptied first)")
    p.add_argument("--data", default=str(REPO / "data" / "coco_shared.yaml"), help="dataset YAML to pack from")
    p.add_argument("--weights", type=Path, default=REPO.parent / "shared" / "weights" / "yolov6lite_s.pt")
    p.add_argument("--val-images", type=int, help="first N val images by id (default: all)")
    p.add_argument("--train-images", type=int, help="N train images, the calibration choice (default: all)")
    p.add_argument("--max-side", type=int, default=320, help="longer image side in the pack (default: %(default)s)")
    p.add_argument("--no-wheels", action="store_true", help="skip the wheel download (no network)")
    p.add_argument("--no-reference", action="store_true", help="skip the CPU reference run")
    return p


def tree_bytes() -> int:
    """Bytes of the working tree that travels: tracked and untracked, not ignored files."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    return sum((REPO / n).stat().st_size for n in names if n and (REPO / n).is_file())


def ptq_supports_device() -> bool:
    done = subprocess.run([sys.executable, "-c", CHILD, "ptq", "-h"], capture_output=True, text=True)
    return "--device" in done.stdout


def reference(pack: Path, extra: list) -> dict:
    """The default Lite-S PTQ on the packed data, on this CPU."""
    args = ["--cfg", "yolov6lite_s", "--weights", "{pack}/weights/yolov6lite_s.pt", "--data", "{pack}/data/data.yaml",
            *extra]
    device = ["--device", "cpu"] if ptq_supports_device() else []
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-c", CHILD, "ptq", *[a.format(pack=pack) for a in args], *device,
               "--out", tmp, "--name", "lite_s_cpu", "--no-progress"]
        print("reference: " + " ".join(cmd[3:]), flush=True)
        code, wall, rss = run_child(cmd, pack / "reference.log")
        if code != 0:
            raise gp.PackError(f"the reference run failed (exit {code}); see {pack / 'reference.log'}")
        report = json.loads((Path(tmp) / "lite_s_cpu" / "report.json").read_text())
    result = gp.reference_result(report, args, wall)
    result.update(device_flag=bool(device), peak_rss_mb=round(rss, 1))
    return result


def main(argv=None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    own, extra = (raw[:raw.index("--")], raw[raw.index("--") + 1:]) if "--" in raw else (raw, [])
    a = build_parser().parse_args(own)
    if not a.weights.is_file():
        raise SystemExit(f"error: weights not found: {a.weights}")
    gp.clear(a.out)
    start = time.perf_counter()
    wheels = [] if a.no_wheels else gp.download_wheels(a.out / "wheels")
    data = gp.pack_data(a.data, a.out / "data", a.max_side, a.val_images, a.train_images)
    (a.out / "weights").mkdir(parents=True)
    shutil.copy2(a.weights, a.out / "weights" / "yolov6lite_s.pt")
    print(f"packed {len(wheels)} wheels, {data['val_images']} val + {data['train_images']} train images", flush=True)
    if not a.no_reference:
        ref = reference(a.out, extra)
        (a.out / "reference.json").write_text(json.dumps(ref, indent=1))
        print(f"reference (CPU): FP32 AP {100 * ref['fp32']['AP']:.2f}, INT8 AP {100 * ref['int8']['AP']:.2f} "
              f"({ref['calibration']['method']}), {ref['wall_s']:.0f} s", flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    total = gp.check_size(a.out, tree_bytes())
    manifest = {"commit": commit, "wheels": wheels, "data": data, "seconds": round(time.perf_counter() - start, 1),
                "pack_bytes": gp.folder_bytes(a.out), "with_tree_bytes": total}
    (a.out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"wrote {a.out}/ ({manifest['pack_bytes'] / 2 ** 20:.1f} MiB; {total / 2 ** 20:.1f} MiB with the working "
          f"tree, limit {gp.LIMIT_BYTES / 2 ** 20:.0f})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except gp.PackError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
