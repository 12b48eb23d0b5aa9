"""Load slice pickles without executing code: only numpy arrays and plain containers are allowed."""
import io
import pickle

from utils.errors import UserError

# What pickle.dumps({'A': np.ndarray, ...}) refers to under numpy 1.x and 2.x, and nothing more.
_ALLOWED = {
    ('numpy', 'ndarray'),
    ('numpy', 'dtype'),
    ('numpy.core.multiarray', '_reconstruct'),
    ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'),
    ('numpy._core.multiarray', 'scalar'),
    ('numpy.core.numeric', '_frombuffer'),
    ('numpy._core.numeric', '_frombuffer'),
    ('numpy', 'float32'), ('numpy', 'float64'), ('numpy', 'float16'),
    ('numpy', 'uint8'), ('numpy', 'int16'), ('numpy', 'uint16'), ('numpy', 'int32'), ('numpy', 'int64'),
    ('builtins', 'dict'), ('builtins', 'list'), ('builtins', 'tuple'), ('builtins', 'set'),
    ('builtins', 'frozenset'), ('builtins', 'bytearray'), ('collections', 'OrderedDict'),
    ('codecs', 'encode'), ('_codecs', 'encode'),  # protocol 2 stores array bytes through codecs.encode
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f'refused to load {module}.{name}')


def load_pickle(path):
    """Unpickle `path` allowing only numpy arrays and plain containers; anything else is a UserError."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as error:
        raise UserError(f'{path}: cannot read ({error.strerror})') from None
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as error:
        raise UserError(f'{path}: not a slice pickle this project can load safely ({error}); '
                        'slice pickles may hold only numpy arrays in a dict') from None
    except Exception as error:  # truncated or corrupt files raise EOFError, ValueError, ...
        raise UserError(f'{path}: corrupt pickle ({type(error).__name__}: {error}); '
                        're-create it with dataset/generate_paired_dataset.py') from None
