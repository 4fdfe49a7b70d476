"""mlcore: exact, tested meta-learning algorithms for the executable book on meta-learning.

Submodules (import what you need; nothing heavy is imported here):

- ``mlcore.tasks``     TaskBatch, SineTasks                        (foundation)
- ``mlcore.models``    MLP, Conv4 and normalisation policies       (foundation)
- ``mlcore.inner``     the one differentiable inner loop            (foundation)
- ``mlcore.maml``, ``mlcore.metasgd``, ``mlcore.anil``, ``mlcore.reptile``   gradient-based methods
- ``mlcore.compiled``  the compiled meta-gradient of the MAML family (``compile=``)
- ``mlcore.protonet``, ``mlcore.matching``                           metric-based methods
- ``mlcore.episodes``, ``mlcore.data.omniglot``, ``mlcore.evaluate``, ``mlcore.viz``
"""
__version__ = "0.1.0"
