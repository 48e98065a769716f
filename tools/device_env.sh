# Source on the GPU machine: makes bundled libraries and the pip nvidia-* CUDA libraries loadable.
_am_nv=$(python3 -c "import nvidia,os;p=nvidia.__path__[0];print(':'.join(os.path.join(p,d,'lib') for d in os.listdir(p)))" 2>/dev/null || true)
export LD_LIBRARY_PATH="$PWD/.devbuild/lib:${_am_nv}:${LD_LIBRARY_PATH:-}"
unset _am_nv
