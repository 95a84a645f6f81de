"""Op tests run Triton kernels through the interpreter when there is no GPU (tests/conftest.py
sets TRITON_INTERPRET=1). Work around an interpreter bug seen in Triton 3.9: a comparison's
result carries its operands' integer type (int32) with boolean data, so splatting such a scalar
(say `in_row & (src < T)`, a block mask combined with a scalar condition) yields int32 data and
`tl.load` rejects the mask ("mask has unsupported dtype"). Compiled kernels are unaffected.
The patch keeps boolean data boolean; it changes nothing where the interpreter is already right.
"""
import os

import numpy as np

if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        from triton.runtime import interpreter as _interp
    except ImportError:  # pragma: no cover - no Triton
        _interp = None

    if _interp is not None and hasattr(_interp, "InterpreterBuilder"):
        _builder = _interp.InterpreterBuilder
        _splat = getattr(_builder, "create_splat", None)

        if _splat is not None and not getattr(_splat, "_skipgpt_bool_fix", False):

            def create_splat(self, ret_ty, arg):
                out = _splat(self, ret_ty, arg)
                data = getattr(arg, "data", None)
                if isinstance(data, np.ndarray) and data.dtype == np.bool_ and out.data.dtype != np.bool_:
                    out = _interp.TensorHandle(out.data.astype(np.bool_), out.dtype)
                return out

            create_splat._skipgpt_bool_fix = True
            _builder.create_splat = create_splat
