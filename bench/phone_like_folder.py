"""Phone-like variants of a Fruits-360 folder's Training photos written as an image folder (`<Class>/*.jpg`), with a
families file mapping each folder to its class: `fruitpipe run` embeds it and `train --also ... --finetune` learns
from it in place of real photos, for issue 34's "Fruits-360 only" fine-tuning (docs/real-photos.md).

    python bench/phone_like_folder.py ../shared/data/fruits360-sample out/variants \
        --families ../shared/data/grocery-store/families.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from fruitpipe import augment, images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input", type=Path, help="a Fruits-360 folder (Training/<Class>/*.jpg)")
    ap.add_argument("dest", type=Path, help="where to write train/<Class>/*.jpg and families.json")
    ap.add_argument("--per-class", type=int, default=20, help="photos per class, the first by content id "
                    "(default 20: the studio photos --finetune takes per class)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--families", type=Path, help="a families file to extend (the held-out photos' folders)")
    args = ap.parse_args()
    families = json.loads(args.families.read_text()) if args.families else {}
    n, folders = 0, 0
    for folder in sorted(p for p in (args.input / "Training").iterdir() if p.is_dir()):
        photos = sorted((images.content_id(p.read_bytes()), p) for p in folder.iterdir() if p.is_file())
        (args.dest / "train" / folder.name).mkdir(parents=True, exist_ok=True)
        for cid, path in photos[:args.per_class]:
            rgb = images.decode_rgb(path.read_bytes(), images.DEFAULT_MAX_PIXELS)
            variant = augment.phone_like(rgb, augment.variant_rng(args.seed, cid, 0))
            Image.fromarray(variant).save(args.dest / "train" / folder.name / f"{cid[:16]}.jpg", quality=95)
            n += 1
        families[folder.name] = [folder.name]
        folders += 1
    (args.dest / "families.json").write_text(json.dumps(families, indent=1))
    print(f"{n} variants in {folders} class folders in {args.dest / 'train'}")


if __name__ == "__main__":
    main()
