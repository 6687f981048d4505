"""KV-cache transfer: prefill pushes each layer's KV blocks into decode's reserved blocks.

Flow: the decode worker reserves blocks and builds a ``TransferDescriptor`` (NATS carries it to
the prefill worker). The prefill worker calls ``SenderCore.begin``, then ``SendHandle.send_layer``
after each layer is computed (a link pushes it while the next layer computes), then
``SendHandle.finish`` with the first sampled token. ``ReceiverCore`` validates each frame and
writes it into the reserved blocks.

Modules: ``sender`` and ``receiver`` (the cores: no sockets; who owns which blocks when),
``sockets`` (their ZeroMQ shells, one thread each), ``loopback`` (the cores joined in memory),
``layout`` (cache checks). The frame format is ``disagg.shared.protocol.kv_wire``.
"""
