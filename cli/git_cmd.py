"""``saga export --git`` and ``saga commit --git``: a saga as git commits (overlayd/gitexport.py).

Registered on the ``saga`` group by ``register(main)``: adds the ``export`` command, and the
``--git`` options to ``commit`` (without them ``commit`` runs as before). overlayd.gitexport
(subprocess, tempfile) is imported by the functions that use it: every ``saga`` call loads this
module, and only these commands need git.
"""

import os
import sys

import click

from overlayd.cli import saga_common as sc
from overlayd.client import ClientError, NoDaemon, PermissionDenied
from overlayd.paths import quote_path

JSON_KEYS = {
    "export --git": ["version", "saga", "repo", "branch", "parent", "head", "commits", "skipped"],
    "commit --git": ["version", "saga", "changes", "count", "seconds", "left_out", "git"],
}

git_options = [
    click.option("--repo", metavar="DIR", help="The git work tree to write to (default: the base, when it is one)."),
    click.option("--branch", metavar="NAME", help="The branch to point at the last commit (default: saga/SAGA-NAME)."),
    click.option("--squash", is_flag=True, help="One commit for the whole saga instead of one per step."),
    click.option("--parent", "parent_rev", metavar="REV",
                 help="The first commit's parent (default: the base's HEAD when the saga began; with --repo "
                      "naming another repository, its HEAD)."),
    click.option("--force", is_flag=True, help="Move the branch even if it exists and points elsewhere."),
]


def with_git_options(fn):
    for opt in reversed(git_options):
        fn = opt(fn)
    return fn


def _fds(t, pairs):
    """Read-only fds of layer files from the daemon (saga.export with 'open')."""
    try:
        with t.client() as c:
            return c.call_fds("saga.export", open=pairs)[1]
    except NoDaemon:
        raise sc.SagaError(f"no daemon serves the workspace {t.name} ({t.mountpoint}); {t.remount_hint()}", 5) \
            from None
    except PermissionDenied as exc:
        raise sc.SagaError(f"permission denied: {exc.message}", 7) from None
    except ClientError as exc:
        raise sc.SagaError(exc.message, sc.EXIT.get(exc.code, 1), exc.data) from None


def prepare(t, *, repo, branch, parent_rev, rule_args, open_step):
    """(repo, branch, parent, saga.export's answer, warnings), checked; nothing written yet."""
    from overlayd import gitexport

    base = t.call("status")["base"]
    repo = os.path.abspath(repo) if repo else base
    if not gitexport.is_work_tree(repo):
        raise sc.SagaError(f"{repo} is not a git work tree: nothing to export to; pass --repo DIR naming one"
                           + ("" if repo != base else " (the base is not one)"), 1)
    data = t.call("saga.export", steps=True, open_step=open_step, **rule_args)
    warnings = []
    if parent_rev:
        try:
            parent = gitexport.git(repo, "rev-parse", "--verify", "-q", parent_rev + "^{commit}").decode().strip()
        except gitexport.GitError:
            raise sc.SagaError(f"--parent {parent_rev}: no such commit in {repo}", 2) from None
    elif os.path.realpath(repo) == os.path.realpath(base) and data.get("base_head"):
        parent = data["base_head"]
    else:
        parent = gitexport.head(repo)
        if os.path.realpath(repo) == os.path.realpath(base):
            warnings.append("the saga began before its base's HEAD was recorded (or the repository had no commit "
                            f"then): the commits' parent is the HEAD of now ({(parent or 'none')[:12]})")
    try:
        branch = gitexport.check_branch(repo, branch or f"saga/{data['saga']['name']}")
    except gitexport.GitError as exc:
        raise sc.SagaError(str(exc), 2) from None
    return repo, branch, parent, data, warnings


def write(t, repo, branch, parent, data, *, squash, force, move_ref=True):
    from overlayd import gitexport

    if not data["steps"]:
        raise sc.SagaError(f"saga {data['saga']['name']!r} has no finished step to export (the open step is "
                           "exported once it is finished: saga step NEXT, or saga commit --git)", 1)
    try:
        res = gitexport.build(repo, data, lambda pairs: _fds(t, pairs), parent=parent, squash=squash)
        if move_ref:
            gitexport.update_branch(repo, branch, res["head"], force=force)
    except gitexport.GitError as exc:
        raise sc.SagaError(str(exc), 1) from None
    return res


def _lines(saga, repo, branch, parent, res, warnings, moved=True):
    out = [f"warning: {w}" for w in warnings]
    out.append(f"{'exported' if moved else 'wrote'} saga {saga['id']} {saga['name']!r} as {len(res['commits'])} "
               f"commit(s) onto {branch} in {repo} (parent {(parent or 'none')[:12]})")
    for c in res["commits"]:
        out.append(f"  {c['sha'][:12]}  " + (f"step {c['step']} {c['name']}" if c["step"] is not None
                                               else f"{c['name']} (squashed)"))
    for s in res["skipped"]:
        out.append(f"  left out {quote_path(s['path'])}: {s['why']}")
    return out


def register(main) -> None:
    """Add ``export`` to the saga group *main* and the --git options to its ``commit``."""
    sc.JSON_KEYS.update(JSON_KEYS)

    @main.command("export")
    @click.option("--git", "as_git", is_flag=True, required=True, help="Export as git commits (the only format).")
    @with_git_options
    @sc.with_rules
    @sc.common
    @click.pass_context
    def export(ctx, as_git, repo, branch, squash, parent_rev, force, exclude, include_ignored, workspace, as_json):
        """Write the active saga's finished steps as git commits onto a branch.

        One commit per finished step (rolled-back and compensated steps never appear; the open
        step once finished), or one for the saga (--squash), onto --branch (default
        saga/SAGA-NAME). The first parent is the base's HEAD when the saga began; each tree is
        that commit's tree plus the saga's changes up to the end of the step, by the commit's
        rules (paths git ignores are left out unless --include-ignored). Only objects and the
        branch are written: the work tree, the index and HEAD are never touched. Push the
        branch to review the saga as a pull request. Exit 1 when the target is no git work
        tree or the branch exists elsewhere (--force moves it).

        \b
        Example:
            saga export --git                 # saga/NAME in the base's repository
            git log --stat saga/NAME
            git push origin saga/NAME
        """
        if not as_git:
            raise click.UsageError("give the format: --git")
        rule_args = {"exclude": list(exclude) or None, "include_ignored": include_ignored or None}

        def go(t):
            repo_, branch_, parent, data, warnings = prepare(t, repo=repo, branch=branch, parent_rev=parent_rev,
                                                             rule_args=rule_args, open_step=False)
            res = write(t, repo_, branch_, parent, data, squash=squash, force=force)
            for w in warnings if ctx.obj["json"] else ():
                click.echo(f"warning: {w}", err=True)
            sc.emit(ctx, {"saga": data["saga"], "repo": repo_, "branch": branch_, "parent": parent,
                          "head": res["head"], "commits": res["commits"], "skipped": res["skipped"]},
                    "\n".join(_lines(data["saga"], repo_, branch_, parent, res, warnings)))

        sc.run(ctx, workspace, as_json, go)

    commit = main.commands["commit"]
    plain = commit.callback
    commit.params[:0] = [click.Option(["--git", "as_git"], is_flag=True,
                                      help="Also write the saga as git commits (see 'saga export --git'); the "
                                           "branch then points at what went into the base.")]
    for opt in git_options:
        opt(commit)  # click.option applied to a Command appends to its params
    commit.help += ("\n\n--git writes, before the commit, one git commit per step (the open one included) "
                    "and moves the branch once the commit went through; a refused commit moves nothing.")

    @click.pass_context
    def commit_cb(ctx, as_git, repo, branch, squash, parent_rev, force, **kw):
        if not as_git:
            if any((repo, branch, squash, parent_rev, force)):
                raise click.UsageError("--repo, --branch, --squash, --parent and --force go with --git")
            return ctx.invoke(plain, **kw)
        return _commit_git(ctx, repo=repo, branch=branch, squash=squash, parent_rev=parent_rev, force=force, **kw)

    commit.callback = commit_cb


def _commit_git(ctx, *, repo, branch, squash, parent_rev, force, dry_run, exclude, include_ignored, workspace,
                as_json):
    from overlayd import gitexport

    rule_args = {"exclude": list(exclude) or None, "include_ignored": include_ignored or None}

    def go(t):
        writable = t.call("saga.status").get("writable")
        if writable and not dry_run:
            t.call("layer.seal", sealed=True)  # the open step's files must not change between export and commit
        try:
            repo_, branch_, parent, data, warnings = prepare(t, repo=repo, branch=branch, parent_rev=parent_rev,
                                                             rule_args=rule_args, open_step=True)
            if dry_run:
                r = t.call("saga.commit", dry_run=True, **rule_args)
                r["git"] = {"repo": repo_, "branch": branch_, "parent": parent,
                            "steps": [{"index": s["index"], "name": s["name"]} for s in data["steps"]]}
                lines = [f"{c['change']:9} {quote_path(c['path'])}  (step {c['step']} {c['step_name']})"
                         for c in r["changes"]]
                lines += [f"CONFLICT  {quote_path(c['path'])}" for c in r["conflicts"]]
                lines.append(f"git: {1 if squash else len(data['steps'])} commit(s) onto {branch_} in {repo_} "
                             f"(parent {(parent or 'none')[:12]})")
                sc.emit(ctx, r, "\n".join(lines))
                if r["conflicts"]:
                    sys.exit(3)
                return
            res = write(t, repo_, branch_, parent, data, squash=squash, force=force, move_ref=False)
            if not force:  # refuse before the commit, not after it
                r0 = gitexport.git(repo_, "rev-parse", "--verify", "-q", f"refs/heads/{branch_}", check=False)
                old = r0.decode().strip() or None
                if old is not None and old != res["head"]:
                    raise sc.SagaError(f"the branch {branch_} exists (at {old[:12]}) and is not this export; pass "
                                       "--force to move it, or --branch NAME for another one; nothing was committed",
                                       1)
            r = t.call_with_progress("saga.commit", "committing", dry_run=False, **rule_args)
        except BaseException:
            if writable and not dry_run:
                try:
                    if (t.call("saga.status").get("saga") or {}).get("state") == "active":
                        t.call("layer.seal", sealed=False)
                except sc.SagaError:
                    pass
            raise
        try:
            gitexport.update_branch(repo_, branch_, res["head"], force=force)
        except gitexport.GitError as exc:
            raise sc.SagaError(f"the saga was committed, but the branch was not moved: {exc}; the commit is "
                               f"{res['head']} (git branch {branch_} {res['head'][:12]})", 1) from None
        r["git"] = {"repo": repo_, "branch": branch_, "parent": parent, "head": res["head"],
                    "commits": res["commits"], "skipped": res["skipped"]}
        n = sum(1 + c.get("entries", 0) for c in r.get("left_out", []))
        text = [f"committed {sc._saga_line(r['saga'])}: {r['count']} change(s) in {r['seconds']:.2f}s"
                + (f"; {n} path(s) left out (ignored or excluded), dropped with the layers" if n else "")]
        text += _lines(r["saga"], repo_, branch_, parent, res, warnings)
        sc.emit(ctx, r, "\n".join(text))

    try:
        sc.run(ctx, workspace, as_json, go)
    except sc.SagaError as exc:
        if exc.exit_code == 3 and not ctx.obj["json"]:
            for c in exc.data.get("conflicts", []):
                click.echo(f"conflict: {quote_path(c['path'])}" + (f" ({c['reason']})" if c.get("reason") else ""),
                           err=True)
        raise
