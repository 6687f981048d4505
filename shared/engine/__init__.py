"""The engine: a torch-free scheduler (``scheduler``, over the ``block_pool``), a model runner
(``runner``: batch layout, forward, ``sampler``) and the ``engine`` that steps them together;
``kv_cache`` owns the KV tensor and ``runtime`` builds it all from a model folder."""
