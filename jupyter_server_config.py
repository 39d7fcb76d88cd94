"""JupyterLab for this project: a notebook opens unmodified and is saved clean.

JupyterLab marks a notebook modified as soon as its kernel starts if the notebook's `kernelspec` display
name or its `language_info` differ from what the kernel reports; and `nbdev_clean`, which keeps the
notebooks free of noise in git, sets the display name to the kernel's name and drops `language_info`, so
every clean notebook differs. This server therefore fills both in, as the kernel will report them, when it
hands a notebook to JupyterLab, and cleans a notebook as `nbdev_clean` does when JupyterLab saves it (nbdev's
own hook; `jupyter_hooks = True` in settings.ini). Opening changes nothing, and saving writes the clean file.

`make install` copies this file into the environment (.venv/etc/jupyter/), where `jupyter lab` reads it.
"""
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager


def describe_kernel(metadata: dict):
    "Set a notebook's kernelspec display name and `language_info` as its kernel will report them, where known."
    spec = metadata.get('kernelspec') or {}
    try: kernel = KernelSpecManager().get_kernel_spec(spec.get('name', ''))
    except NoSuchKernel: return
    spec['display_name'] = kernel.display_name
    if spec['name'] == 'python3':  # ipykernel, run by this server's interpreter: it reports this description
        from ipykernel.ipkernel import IPythonKernel
        metadata['language_info'] = IPythonKernel.language_info


class DescribedNotebooks(AsyncLargeFileManager):
    "The server's files, with each notebook's metadata completed as its kernel will report it."
    async def get(self, path, content=True, type=None, format=None, **kwargs):
        model = await super().get(path, content=content, type=type, format=format, **kwargs)
        if model['type'] == 'notebook' and content: describe_kernel(model['content']['metadata'])
        return model


c = get_config()  # noqa: F821 (Jupyter's config files are run with get_config defined)
c.ServerApp.contents_manager_class = DescribedNotebooks
c.ContentsManager.pre_save_hook = 'nbdev.clean.clean_jupyter'
