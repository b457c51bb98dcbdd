"""The `strop` command. Nothing imports this package.

`main.py` builds the parser and runs a command with the one error handling every command shares
(`error:` lines, interrupts, broken pipes, distributed failures). Each command group is one module
that declares its arguments and its handler (`register(sub)` adds the subparsers, each with
`set_defaults(handler=...)`): training (quickstart, train, tune), generation (chat, generate, eval),
predict (predict, explain, score), export (merge, export), serve, reports (report, compare), data,
rag, ui, models and configs. `options.py` holds the options several commands share, so one idea has
one name everywhere; `launch.py` starts `train --nproc` processes. Heavy imports (torch,
transformers) happen inside handlers, so `strop --help` stays fast.
"""
