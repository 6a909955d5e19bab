"""The demo: procedural scenes whose ground truth is known, run through the real system end to end on a CPU.

Everything demo-specific lives here and plugs into the production code by name, as a user's own plug-ins would:
the weight-free latent codec (`demo.codec:PoolingCodec`, a `pretrained.vae_class`), the synthetic-scene captioner
(`demo.captioner:build_synthetic_captioner`, a `caption.backend`), the small T5 (`demo.text_encoder`), the source
layouts (`demo.layouts`), the scenes (`demo.scenes`) and the held-out grader (`demo.evaluator`).
`python -m demo` (or `make demo`) runs it; its configs are in demo/configs/.
"""
