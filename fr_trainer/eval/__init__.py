"""Evaluation: LFW-style `.bin` verification (10-fold), IJB-C / IJB-B 1:1 and 1:N.

    from fr_trainer.eval.verification import evaluate, verify_bin
    from fr_trainer.eval.ijb import tar_at_far, evaluate_ijb
    from fr_trainer.eval.embedder import load_embedder, embed_images, shard_slice

Modules: metrics (numpy ROC, TAR@FAR, k-fold), binset (.bin I/O), align (5-point
similarity + warp), embedder (ONNX / torch), verification, ijb, plots (matplotlib,
lazy), cli (`fr-trainer verify|ijb`), synthetic (test/bench data), bench.
Nothing heavy is imported here.
"""
