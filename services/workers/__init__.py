"""Workers: the prefill and decode cores (``prefill``, ``decode``: no I/O) and their shells
(``service`` for what every role shares, ``prefill_service``, ``decode_service``, ``main``)."""
