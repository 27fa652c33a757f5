#!/usr/bin/env python3
"""The pictures of the README's "How far to believe it" section, from two CLI runs:

    convscope evaluate demo/datasets/sample-photos --top-k 1000 --out /tmp/eval
    convscope visualize demo/images/coffee.jpg --method adversarial --out /tmp/adv
    python3 scripts/believe_figures.py /tmp/eval /tmp/adv docs/

writes ``reliability-demo.png`` (the reliability diagram and its ECE lines as the report draws
them, screenshot by Chromium) and ``adversarial-demo.png`` (the adversarial method's panels side
by side, labelled with ε and the new class), and prints the figures the README quotes.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking"]
PANEL_PX = 224

log = logging.getLogger("believe_figures")


def reliability_png(evaluation_dir: Path, out: Path) -> None:
    """Screenshot of the report's calibration block (the diagram and the lines under it)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 560, "height": 1400}, device_scale_factor=2)
        page.goto((evaluation_dir / "report.html").resolve().as_uri())
        page.locator(".eval-summary > div").nth(1).screenshot(path=str(out))
        browser.close()


def adversarial_png(visualize_dir: Path, out: Path) -> dict:
    """The original as the model sees it, then the method's panels, each captioned."""
    results = json.loads((visualize_dir / "results.json").read_text(encoding="utf-8"))
    image = results["images"][0]
    panels = image["visualizations"][0]["panels"]
    first = panels[0]
    top = image["predictions"][0]
    tiles = [(image_dir_file(visualize_dir, image, "model-view.png"),
              f"original: {top['label']} (p = {top['probability']:.2f})")]
    captions = ["change per pixel (0-255 units)", "perturbation, amplified",
                (f"perturbed: {first['new_class']['label']} "
                 f"(p = {first['new_class']['probability']:.2f})"),
                f"Grad-CAM, original: {top['label']}",
                f"Grad-CAM, perturbed: {first['new_class']['label']}"]
    for panel, caption in zip(panels, captions):
        tiles.append((visualize_dir / panel["overlay"], caption))
    font = ImageFont.load_default(size=13)
    caption_px = 22
    sheet = Image.new("RGB", (len(tiles) * (PANEL_PX + 8) + 8, PANEL_PX + caption_px + 40),
                      "white")
    draw = ImageDraw.Draw(sheet)
    for number, (path, caption) in enumerate(tiles):
        with Image.open(path) as tile:
            tile = tile.convert("RGB").resize((PANEL_PX, PANEL_PX))
            x = 8 + number * (PANEL_PX + 8)
            sheet.paste(tile, (x, 8))
            draw.text((x, PANEL_PX + 14), caption, fill="black", font=font)
    draw.text((8, PANEL_PX + caption_px + 18),
              f"smallest L-inf perturbation found by PGD: epsilon = {first['epsilon']:.3g} "
              f"of 255 per pixel channel", fill="black", font=font)
    sheet.save(out, optimize=True)
    return {"file": image["file"], "epsilon": first["epsilon"],
            "new_class": first["new_class"], "original": top}


def image_dir_file(visualize_dir: Path, image: dict, name: str) -> Path:
    folder = Path(image["visualizations"][0]["panels"][0]["overlay"]).parent
    return visualize_dir / folder / name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("evaluation", type=Path, help="a `convscope evaluate` output folder")
    parser.add_argument("visualization", type=Path,
                        help="a `convscope visualize --method adversarial` output folder")
    parser.add_argument("docs", type=Path, help="where the PNGs go")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    reliability_png(args.evaluation, args.docs / "reliability-demo.png")
    adversarial = adversarial_png(args.visualization, args.docs / "adversarial-demo.png")
    document = json.loads((args.evaluation / "evaluation.json").read_text(encoding="utf-8"))
    log.info("accuracy %.3f on %d images, ECE %.3f, confidently wrong (>= %.2f): %d",
             document["accuracy"], len(document["images"]), document["calibration"]["ece"],
             document["confidently_wrong"]["level"],
             len(document["confidently_wrong"]["images"]))
    log.info("temperature scaling: %s", {key: value for key, value in
                                         document["temperature_scaling"].items()
                                         if key != "bins_after"})
    log.info("adversarial: %s", adversarial)


if __name__ == "__main__":
    main()
