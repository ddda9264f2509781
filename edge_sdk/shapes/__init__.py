"""The "shapes" yardstick: the procedural scenes the default model is trained on, their
captions, and an OpenCV evaluator that reads back what a generated image shows.

It is the one model whose output quality we can measure, so quantization, tiling and every
backend are judged on it (`edge-sdk evaluate`).
"""
