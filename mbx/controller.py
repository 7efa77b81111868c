"""The Controller: application files, the registry of NFs and μStacks, type checks.

An application file (TOML) names the μStack options, the NFs in chain order, their
options, subscription filters and parallel groups::

    [app]
    name = "ids"
    stack = "auto"              # auto | network | tcp

    [stack]                     # App options: flow_capacity, idle_timeout, overlap...
    flow_capacity = 65536

    [[nf]]
    name = "dpi"
    use = "mbx/examples/ids.py" # a built-in NF, a .py file, or module:attr
    group = "inspect"           # NFs of one group run in parallel (read-only NFs)

    [[nf]]
    name = "lb"
    use = "l4lb"
    options = { vip = "198.18.3.1:80" }
    [nf.filter]                 # on every subscription of this NF
    dst_port = [80, 8080]
    [nf.filters."FLOW/END"]     # on one subscription
    proto = "tcp"

    [groups.inspect]            # how a parallel group merges its members' verdicts:
    merge = "all"               # "any" drop wins (the default), "all" must drop, or a
    #                             merge function: "votes.py:majority", "pkg.mod:fn"

The Controller links each subscription to the publications that can feed it (a
publication feeds a subscription when it is the subscribed type or a descendant:
paper §3.3): the μStacks' publications, and those of the NFs before it in the chain
(an NF also republishes what it subscribes to).  A subscription nothing can feed, a
writer in a parallel group, a member of a group subscribed to what another member
publishes, an NF listed twice, two NFs writing one file, a bad option or filter, a
merge function that cannot be loaded or called: each is refused with an error
naming the file, the line, the NF and the types.
"""
import itertools
import json
import os
import re
import tomllib

from mbx import _events
from mbx.errors import AppError, MbxError, OptionError, exc_text, raising_line
from mbx.pipeline import check_failure_policy
from mbx.runtime import (
    STACK_SWITCHES,
    WHOLE_STACK_OPTIONS,
    output_clash,
    stack_options_problem,
)

# What each μStack publishes.
NETWORK_LAYER_PUBS = [_events.PKT, _events.FLOW_START, _events.FLOW_END]
TCP_MONITOR_PUBS = [_events.PKT_TCP_SYN, _events.PKT_TCP_FIN, _events.PKT_TCP_RST,
                    _events.PKT_TCP_RETRANSMISSION, _events.PKT_TCP,
                    _events.FLOW_TCP_START, _events.FLOW_TCP_ESTABLISHED,
                    _events.FLOW_TCP_STATE, _events.FLOW_TCP_TERMINATE,
                    _events.FLOW_TCP_GAP, _events.FLOW_TCP_OVERLAP_CONFLICT,
                    _events.FLOW_TCP_MEMCAP, _events.DATA_RDY]


def publications(tcp, nfs):
    """What a run with the TCP Monitor (``tcp``) or the Network Layer alone can
    deliver: (the μStack's name, every EventType it and ``nfs`` publish, what the TCP
    Monitor would add)."""
    types = _events.event_types()
    if tcp:
        return ("TCP Monitor", NETWORK_LAYER_PUBS + TCP_MONITOR_PUBS
                + [types[i] for nf in nfs for i in nf.pubs], [])
    return ("Network Layer", NETWORK_LAYER_PUBS + [types[i] for nf in nfs for i in nf.pubs],
            TCP_MONITOR_PUBS)


# [stack] option -> what its value must be (ranges are the stack's to check)
_STACK_KEYS = {**dict.fromkeys(WHOLE_STACK_OPTIONS, "a whole number"),
               **dict.fromkeys(("idle_timeout", "frag_timeout"), "a number of seconds"),
               **dict.fromkeys(("flow_policy", "malformed", "overlap", "checksums"),
                               "a string"),
               **dict.fromkeys(STACK_SWITCHES, "true or false")}
_KIND_OK = {"a whole number": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "a number of seconds": lambda v: isinstance(v, int | float)
            and not isinstance(v, bool),
            "a string": lambda v: isinstance(v, str),
            "true or false": lambda v: isinstance(v, bool)}
_NF_KEYS = {"name", "use", "options", "group", "filter", "filters", "failure", "restart",
            "restart_backoff"}
_GROUP_KEYS = {"merge"}


class AppSpec:
    """A loaded application: its NFs (in chain order), options, and the link graph."""

    def __init__(self, path, name, stack, options, nfs, links, warnings=(), lines=None):
        self.path = path
        self.lines = lines          # per NF, the line of its [[nf]] table (or None)
        self.name = name
        self.stack = stack      # the one that runs: "network" or "tcp"
        self.declared_stack = stack     # [app] stack as written ("auto" if left out)
        self.warnings = list(warnings)      # what a run would ignore
        self.options = options
        self.nfs = nfs
        self.links = links          # [(subscriber NF, type, [publishers])]

    def where(self, i):
        """Where the i-th NF is set up, for errors: "FILE, line N" (or the file)."""
        return _at(self.path, self.lines[i] if self.lines else None)

    def graph(self):
        """The application as text: stacks, NFs, and what feeds each subscription."""
        lines = [f"application {self.name} ({self.path})",
                 f"  stack: {self.stack}" + (f"  {self.options}" if self.options else "")]
        lines += [f"  warning: {w}" for w in self.warnings]
        for i, nf in enumerate(self.nfs, 1):
            flags = []
            if nf.writes:
                flags.append("writes")
            if nf.group is not None:
                flags.append(f"parallel group {nf.group}, "
                             f"merge {_events.merge_name(nf.group_merge)}")
            lines.append(f"  {i}. NF {nf.name}" + (f" ({', '.join(flags)})" if flags else ""))
            for sub, t, pubs in self.links:
                if sub is nf:
                    flt = nf.filters.get(t.idx, nf.filters.get(None))
                    where = f"  [{flt!r}]" if flt is not None else ""
                    lines.append(f"       <- {t.name:<22} from {', '.join(pubs)}{where}")
            for idx in nf.pubs:
                lines.append(f"       -> {_events.event_types()[idx].name}")
        return "\n".join(lines)


def unused_warning(unused, stack):
    """What to tell a user whose TCP Monitor options ``unused`` go unused."""
    what = "a TCP Monitor option" if len(unused) == 1 else "TCP Monitor options"
    why = ("the stack is set to the Network Layer" if stack == "network" else
           "no NF subscribes to a TCP type, so the Network Layer runs alone")
    return (f"{', '.join(unused)}: {what}, unused: {why} ([app] stack = \"tcp\" or "
            f"--stack tcp runs the Monitor)")


def publication_loop(nfs):
    """A loop of NFs each subscribed to what the one before it publishes (explicit
    publications; an NF never receives its own), as "NF a -> NF b (YEV) -> NF a
    (XEV)", or None.  Inline, a publication reaches an earlier NF in the chain too,
    so handlers that always publish on such a loop's events pass one packet's events
    round it until Event Memory fills: worth a warning, not a refusal, as a handler
    may publish only on some events."""
    types = _events.event_types()

    def feeds(a, b):
        # the first type a publishes that b takes, or None
        if a is b or (a.group is not None and a.group == b.group):
            return None
        for j in a.pubs:
            for idx in b.subs:
                if types[j].is_a(types[idx]):
                    return types[j].name
        return None

    def walk(path, seen):
        for nxt in nfs:
            via = feeds(path[-1][0], nxt)
            if via is None:
                continue
            if nxt is path[0][0]:
                return path + [(nxt, via)]
            if nxt not in seen:
                seen.add(nxt)
                found = walk(path + [(nxt, via)], seen)
                if found:
                    return found
        return None

    for start in nfs:
        loop = walk([(start, None)], {start})
        if loop:
            return " -> ".join(f"NF {nf.name}" + (f" ({via})" if via else "")
                               for nf, via in loop)
    return None


def lone_groups_warning(nfs):
    """A warning for parallel groups of one NF, or None: such a group runs as if
    ungrouped, so its name is most likely a typo for another group's."""
    counts = {}
    for nf in nfs:
        if nf.group is not None:
            counts.setdefault(nf.group, []).append(nf.name)
    lone = [f"{g!r} (NF {names[0]})" for g, names in counts.items() if len(names) == 1]
    if not lone:
        return None
    return (f"parallel group(s) of one NF: {', '.join(lone)}; a group runs its NFs side "
            "by side, so one NF alone runs as if ungrouped (a misspelt group name?)")


def loop_warning(loop):
    return (f"NFs publish to each other in a loop: {loop}; if their handlers always "
            "publish, one packet's events go round it until Event Memory fills")


# tomllib keeps no positions: the lines of tables and keys are found in the text, by
# a scan that knows just enough TOML to tell a statement (a table header, a key =
# value) from text inside a value (a multi-line string or array), so that a value
# never passes for a header or a key.  A key or table name is bare, "quoted" or
# 'literal', and dotted paths may have spaces; tomllib itself reads each path.
_PART = r"""(?:"(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_-]+)"""
_PATH = rf"{_PART}(?:\s*\.\s*{_PART})*"
_HEADER = re.compile(rf"\s*(\[\[?)\s*({_PATH})\s*\]\]?\s*(?:#.*)?$")
_ASSIGN = re.compile(rf"\s*({_PATH})\s*=")


def _parts(path):
    # the keys of a dotted path as TOML reads them (quotes, escapes, spaces)
    keys = []
    node = tomllib.loads(f"{path} = 0")
    while isinstance(node, dict):
        (key, node), = node.items()
        keys.append(key)
    return tuple(keys)


def _header(line):
    # ("[" or "[[", the table's path) of a table header line, else None
    m = _HEADER.match(line)
    return (m.group(1), _parts(m.group(2))) if m else None


def _value_state(line, quote, depth):
    """(quote, depth) after ``line``: the multi-line string still open ('''"""''' or
    "'''"), and how many [ and { of a value are."""
    i, n = 0, len(line)
    while i < n:
        if quote:
            if quote == '"""' and line[i] == "\\":
                i += 2
            elif line.startswith(quote, i):
                i += 3
                # (up to two quotes more are the string's own: """a""""" is 'a""')
                for _ in range(2):
                    if i < n and line[i] == quote[0]:
                        i += 1
                quote = None
            else:
                i += 1
            continue
        c = line[i]
        if c == "#":
            break
        if line.startswith('"""', i) or line.startswith("'''", i):
            quote = line[i:i + 3]
            i += 3
        elif c == '"':
            i += 1
            while i < n and line[i] != '"':
                i += 2 if line[i] == "\\" else 1
            i += 1
        elif c == "'":
            end = line.find("'", i + 1)
            i = n if end < 0 else end + 1
        else:
            depth += (c in "[{") - (c in "]}")
            i += 1
    return quote, max(depth, 0)


def _statements(text):
    """(line, path, inline) of each table header and key of a TOML text, its path as
    tomllib reads it, an element of an array of tables by its index: ``("stack",
    "flow_capacity")``, ``("nf", 1)`` (the second ``[[nf]]`` table), ``("nf", 1,
    "options", "rules")`` (under it, in ``[nf.options]`` or as ``options.rules``).
    ``inline``: a key whose value ends on its line (an inline table always does), so
    that the keys inside its value are on that line too."""
    found = []
    arrays = {}         # path of an array of tables -> the index of its last table
    current = ()
    quote, depth = None, 0

    def resolve(parts):
        # a path through arrays of tables goes through their last table
        out = ()
        for part in parts:
            out += (part,)
            if out in arrays:
                out += (arrays[out],)
        return out

    # TOML's lines end at \n alone (a \r before it is the line's own): splitlines()
    # would also break at U+2028, U+0085 and the like, which a comment or string
    # may hold, and so count lines TOML does not
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if quote is None and depth == 0:
            head = _header(line)
            if head is not None:
                kind, parts = head
                if kind == "[[":
                    base = resolve(parts[:-1]) + parts[-1:]
                    arrays[base] = arrays.get(base, -1) + 1
                    current = base + (arrays[base],)
                else:
                    current = resolve(parts)
                found.append([lineno, current, False])
                continue
            m = _ASSIGN.match(line)
            if m:
                found.append([lineno, current + _parts(m.group(1)), True])
                quote, depth = _value_state(line[m.end():], quote, depth)
                continue
        elif found:
            found[-1][2] = False    # a value goes on past its statement's line
        quote, depth = _value_state(line, quote, depth)
    return [tuple(s) for s in found]


def _line(statements, path):
    """The line where ``path`` is given: its own header or key, else the first key
    under it (a table made by dotted keys), else the line of the inline table or
    array of them it is in, when that is on one line; else None: no line rather than
    a wrong one."""
    path = tuple(path)
    for lineno, at, _ in statements:
        if at == path:
            return lineno
    for lineno, at, _ in statements:
        if at[:len(path)] == path:
            return lineno
    for lineno, at, inline in statements:
        if inline and path[:len(at)] == at:
            return lineno
    return None


def _at(path, line):
    # where an error is, as a compiler says it: "FILE:LINE", or the file alone
    return f"{path}:{line}" if line else path


def load_app_file(path, stack=None):
    """Load and check an application file; returns an AppSpec or raises AppError.
    ``stack`` (``mbx run --stack``) wins over the file's ``[app] stack``: the links
    are checked with the stack that will run."""
    from mbx.runtime import load_app

    if not os.path.isfile(path):
        raise AppError(f"application file {path}: "
                       + ("a directory" if os.path.isdir(path) else "no such file"))
    with open(path, "rb") as fh:
        raw = fh.read()
    text = raw.decode("utf-8", "replace")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AppError(f"{path}: {exc}") from None
    statements = _statements(text)

    def at(*paths):
        # the file and the first line of those paths (tables, keys) found in it
        lines = [n for n in (_line(statements, p) for p in paths) if n]
        return _at(path, min(lines, default=None))

    def key_at(table, keys):
        # the first line of keys of [table], else the table's own (a rule about an
        # option left out, at its default)
        where = at(*[(table, k) for k in keys])
        return where if where != path else at((table,))

    unknown = set(doc) - {"app", "stack", "nf", "groups"}
    if unknown:
        raise AppError(f"{at(*[(t,) for t in unknown])}: unknown table(s) "
                       f"{', '.join(sorted(unknown))} "
                       "(expected [app], [stack], [[nf]], [groups.NAME])")
    for table in ("app", "stack", "groups"):
        if not isinstance(doc.get(table, {}), dict):
            raise AppError(f"{at((table,))}: {table} = {doc[table]!r}: expected a "
                           f"[{table}] table")
    if not isinstance(doc.get("nf", []), list) or not all(
            isinstance(e, dict) for e in doc.get("nf", [])):
        raise AppError(f"{at(('nf',))}: nf = {doc['nf']!r}: expected [[nf]] tables")
    app = doc.get("app", {})

    unknown = set(app) - {"name", "stack"}
    if unknown:
        raise AppError(f"{key_at('app', unknown)}: [app] unknown key(s) "
                       f"{', '.join(sorted(unknown))} (known: name, stack)")
    name = app.get("name", os.path.splitext(os.path.basename(path))[0])
    if not isinstance(name, str):
        raise AppError(f"{key_at('app', ['name'])}: [app] name = {name!r}: "
                       "expected a string")
    given = stack
    stack = app.get("stack", "auto")
    if stack not in ("auto", "network", "tcp"):
        raise AppError(f"{key_at('app', ['stack'])}: [app] stack = {stack!r}: use "
                       "auto, network or tcp")
    stack = given or stack
    options = dict(doc.get("stack", {}))
    bad = set(options) - set(_STACK_KEYS)
    if bad:
        raise AppError(f"{key_at('stack', bad)}: [stack] unknown option(s) "
                       f"{', '.join(sorted(bad))} (known: {', '.join(sorted(_STACK_KEYS))})")
    for key, value in options.items():
        if not _KIND_OK[_STACK_KEYS[key]](value):
            raise AppError(f"{key_at('stack', [key])}: [stack] {key} = {value!r}: "
                           f"expected {_STACK_KEYS[key]}")
    problem = stack_options_problem(options)
    if problem:         # at the line of the option it names
        raise AppError(f"{key_at('stack', [problem[0]])}: [stack] {problem[1]}")
    entries = doc.get("nf", [])
    if not entries:
        raise AppError(f"{path}: no [[nf]] tables: an application names at least one NF")
    nfs = []
    lines = []          # per NF of nfs: the line of its [[nf]] table
    loaded = {}         # (file or module:attr, options): the NFs it made, so a
    #                     file that defines several NFs is run once
    base = os.path.dirname(os.path.abspath(path))
    for i, entry in enumerate(entries):
        line = _line(statements, ("nf", i))
        # which [[nf]] table, as a user counts and names them: "[[nf]] #2 "ids""
        called = next((entry[k] for k in ("name", "use") if isinstance(entry.get(k), str)),
                      None)
        table = f"[[nf]] #{i + 1}" + (f" {json.dumps(called, ensure_ascii=False)}"
                                      if called else "")

        def nf_at(*keys, i=i, line=line, table=table):
            # "FILE:LINE: [[nf]] #I "NAME"": the line of the first of keys (paths
            # under the table) found, else of the table's header
            lines = [n for n in (_line(statements, ("nf", i) + k) for k in keys) if n]
            return f"{_at(path, min(lines, default=line))}: {table}"

        bad = set(entry) - _NF_KEYS
        if bad:
            raise AppError(f"{nf_at(*[(k,) for k in bad])}: unknown key(s) "
                           f"{', '.join(sorted(bad))} (known: {', '.join(sorted(_NF_KEYS))})")
        use = entry.get("use")
        if not use or not isinstance(use, str):
            raise AppError(f"{nf_at(('use',))}: needs use = \"NF\" (a built-in, a .py "
                           "file or module:attr)")
        for key, kind, ok in (("name", "a string", str), ("group", "a string", str),
                              ("options", "a table", dict), ("filter", "a table", dict),
                              ("filters", "a table of tables", dict)):
            value = entry.get(key)
            if value is not None and (not isinstance(value, ok) or key == "filters" and
                                      not all(isinstance(v, dict) for v in value.values())):
                raise AppError(f"{nf_at((key,))}: {key} = {value!r}: expected {kind}")
        # an NF file, whole or "FILE.py:NAME" (one NF of several), is found relative
        # to the application file, and only there: a file of the same name in the
        # current directory is another NF, which must not run in its place
        file, colon, nf_name = use.rpartition(":")
        if not (colon and file.endswith(".py")):
            file, nf_name = use, ""
        if file.endswith(".py") and not os.path.isabs(file):
            use = os.path.join(base, file) + (f":{nf_name}" if nf_name else "")
            file = os.path.join(base, file)
            if not os.path.isfile(file):
                raise AppError(f"{nf_at(('use',))}: NF file {file}: no such file (a "
                               "relative path is relative to the application file)")
        stem = os.path.splitext(os.path.basename(file))[0] if file.endswith(".py") else use
        wanted = entry.get("name")
        opts = dict(entry.get("options", {}))
        from mbx.runtime import BUILTIN_NFS

        if use in BUILTIN_NFS and wanted is not None:
            opts.setdefault("name", wanted)
        # keyed by the file, not "FILE.py:NAME": its entries' NFs come from one
        # load of it, and share its module's state, as in a chain
        source = file if file.endswith(".py") else use
        key = (source, repr(sorted(opts.items())))
        if key not in loaded:
            try:
                loaded[key] = load_app(source, {stem: opts} if opts else None)
            except MbxError as exc:
                # at the option's line when it is one; the built-in's "NF l4lb: " is
                # said by the table already
                said = str(exc).removeprefix(f"NF {source}: ")
                raise AppError(f"{nf_at(('options', exc.option))}: {said}"
                               if isinstance(exc, OptionError) else
                               f"{nf_at(('use',))}: {said}") from None
        made = loaded[key]
        for which, named_by in ((nf_name, "use"), (wanted, "name")):
            if which:
                picked = [nf for nf in made if nf.name == which]
                if not picked:
                    raise AppError(f"{nf_at((named_by,))}: {source} defines no NF named "
                                   f"{which!r} (it defines "
                                   f"{', '.join(nf.name for nf in made)})")
                made = picked
        group = entry.get("group")
        for nf in made:
            nf.group = group
            for tname, spec, key in ([(None, entry["filter"], ("filter",))]
                                     if "filter" in entry else []) + [
                    (tname, spec, ("filters", tname))
                    for tname, spec in entry.get("filters", {}).items()]:
                try:
                    nf.filter(tname, **spec)
                except (MbxError, TypeError) as exc:
                    # (a message that names the NF, or says "filter", already is not
                    # prefixed twice)
                    said = str(exc).removeprefix(f"NF {nf.name}: ")
                    said = said if said.startswith("filter") else f"filter: {said}"
                    raise AppError(f"{nf_at(key)}: NF {nf.name}: {said}") from None
            for tname in entry.get("filters", {}):
                # a filter applies to the subscription of exactly its type: on any
                # other it would never be consulted
                if _events.event_type(tname).idx not in nf.subs:
                    subs = ", ".join(t.name for t in _events.event_types()
                                     if t.idx in nf.subs)
                    raise AppError(f"{nf_at(('filters', tname))}: NF {nf.name}: "
                                   f"filters.\"{tname}\": the NF "
                                   f"does not subscribe to {tname}, so the filter would "
                                   f"never apply (it subscribes to {subs or 'nothing'})")
            # for a run's --json: the filters beside what made the NF (its failure
            # policy and restarts every NF has, said for all)
            nf.made_from = {**(nf.made_from or {}), **{
                key: entry[key] for key in ("filter", "filters") if key in entry}}
            # (null is not TOML: a file's NFs are always open or closed)
            nf.failure = entry.get("failure", "closed")
            # restarts of its process in the pipelined deployment (mbx.pipeline)
            nf.restart = entry.get("restart", nf.restart)
            nf.restart_backoff = entry.get("restart_backoff", nf.restart_backoff)
            try:
                check_failure_policy(nf)
            except AppError as exc:
                raise AppError(f"{nf_at(('failure',), ('restart',), ('restart_backoff',))}"
                               f": {exc}") from None
        nfs += made
        lines += [line] * len(made)
    _merge_policies(path, statements, doc.get("groups", {}), nfs)
    return check(path, name, stack, options, nfs, lines)


def _merge_function(spec, base, where):
    # "file.py:function" (relative to the application file, as NF files are) or
    # "module:function": the callable, checked; AppError says why not.
    import importlib
    import runpy

    source, _, attr = spec.rpartition(":")
    if not source or not attr:
        raise AppError(f"{where}: \"any\", \"all\", or a merge function as "
                       "\"file.py:function\" or \"module:function\"")
    try:
        if source.endswith(".py"):
            if not os.path.isabs(source):     # next to the application file only
                source = os.path.join(base, source)
            if not os.path.isfile(source):
                raise AppError(f"{where}: {source}: no such file (a relative path is "
                               "relative to the application file)")
            try:
                scope = runpy.run_path(source, run_name="mbx_merge")
            except Exception as exc:
                at = raising_line(exc, source)
                at = f", line {at[1]}" if at else ""
                raise AppError(f"{where}: {source}{at}: {exc_text(exc)}") from None
            if attr not in scope:
                raise AppError(f"{where}: {source} defines no {attr}")
            fn = scope[attr]
        else:
            try:
                fn = getattr(importlib.import_module(source), attr)
            except (ImportError, AttributeError) as exc:
                raise AppError(f"{where}: {exc_text(exc)}") from None
    except AppError:
        raise
    except Exception as exc:
        raise AppError(f"{where}: {exc_text(exc)}") from None
    return fn


def _merge_policies(path, statements, groups, nfs):
    # [groups.NAME] merge = "any" | "all" | "file.py:function" | "module:function":
    # set on every member, checked here so the error names the file and line of the
    # group's table.
    from mbx._events import MERGES, merge_problem

    members = {nf.group for nf in nfs if nf.group is not None}
    for gname, spec in groups.items():
        where = _at(path, _line(statements, ("groups", gname)))
        if not isinstance(spec, dict):
            raise AppError(f"{where}: groups.{gname} must be a table ([groups.{gname}])")
        bad = set(spec) - _GROUP_KEYS
        if bad:
            lines = [n for n in (_line(statements, ("groups", gname, k)) for k in bad) if n]
            raise AppError(f"{lines and _at(path, min(lines)) or where}: "
                           f"[groups.{gname}] unknown key(s) "
                           f"{', '.join(sorted(bad))} (known: merge)")
        if gname not in members:
            raise AppError(f"{where}: [groups.{gname}]: no NF has group = {gname!r}")
        merge = spec.get("merge", "any")
        if "merge" in spec:         # errors of the merge at its own line
            where = _at(path, _line(statements, ("groups", gname, "merge")))
        if not isinstance(merge, str) or (merge not in MERGES and ":" not in merge):
            raise AppError(f"{where}: parallel group {gname!r}: merge = {merge!r}: use "
                           "\"any\" (a packet any member dropped is dropped), \"all\" "
                           "(dropped only when every member dropped it) or a merge "
                           "function, \"file.py:function\" or \"module:function\"")
        if merge not in MERGES:
            said = f"{where}: parallel group {gname!r}: merge = {merge!r}"
            merge = _merge_function(merge, os.path.dirname(os.path.abspath(path)), said)
            why = merge_problem(merge, [nf.name for nf in nfs if nf.group == gname])
            if why is not None:
                raise AppError(f"{said}: {why}")
        for nf in nfs:
            if nf.group == gname:
                nf.group_merge = merge


def _dependent_member(nfs):
    # The index of the NF _events.group_dependency speaks of: the first member of a
    # group (in chain order, as it looks) subscribed to what a mate publishes.
    types = _events.event_types()
    for i, y in enumerate(nfs):
        if y.group is not None and any(
                types[p].is_a(types[t]) for x in nfs
                if x is not y and x.group == y.group for p in x.pubs for t in y.subs):
            return i
    return None


def check(path, name, stack, options, nfs, lines=None):
    """Type-check and link ``nfs``; returns the AppSpec or raises AppError.  ``lines``
    (per NF, the line of its ``[[nf]]`` table) puts the line in the errors."""
    def at(i):
        return _at(path, lines[i] if lines else None)

    names = [nf.name for nf in nfs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        again = next(i for i, n in enumerate(names) if n in names[:i])
        raise AppError(f"{at(again)}: NF name(s) used twice: {', '.join(dup)}")
    clash = output_clash(nfs, lines)
    if clash is not None:
        raise AppError(f"{at(clash[0])}: {clash[1]}")
    for i, nf in enumerate(nfs):
        try:
            check_failure_policy(nf)    # as a run does, in every deployment
        except AppError as exc:
            raise AppError(f"{at(i)}: {exc}") from None
        if nf.group is not None and nf.writes:
            raise AppError(f"{at(i)}: NF {nf.name} writes packets and cannot run in the "
                           f"parallel group {nf.group!r}: writers are serialised")
    groups = [nf.group for nf in nfs]
    for g in dict.fromkeys(g for g in groups if g is not None):   # in chain order
        members = [i for i, x in enumerate(groups) if x == g]
        for before, i in itertools.pairwise(members):
            if i != before + 1:
                # the line of the member the other NFs cut off from its group
                raise AppError(f"{at(i)}: parallel group {g!r} is split by other NFs "
                               f"(NF {nfs[before + 1].name}): list its NFs next to "
                               "each other")
    why = _events.group_dependency(nfs)
    if why is not None:
        dependent = _dependent_member(nfs)
        raise AppError(f"{at(dependent) if dependent is not None else path}: {why}")
    from mbx.runtime import runs_monitor, unused_monitor_options

    tcp = runs_monitor(stack, nfs, options)
    stack_name, stack_pubs, monitor_pubs = publications(tcp, [])
    types = _events.event_types()
    links = []
    for i, nf in enumerate(nfs):
        for idx in nf.subs:
            t = types[idx]
            feeders = []
            if any(p.is_a(t) for p in stack_pubs):
                feeders.append(stack_name)
            for other in nfs[:i] + nfs[i + 1:]:
                if nf.group is not None and other.group == nf.group:
                    continue    # the members of a group run side by side, not in turn
                pubs = [types[j] for j in other.pubs]
                later = nfs.index(other) > i
                if not later:
                    pubs += [types[j] for j in other.subs]     # implicit republication
                if any(p.is_a(t) for p in pubs):
                    # a later NF's publication reaches an earlier NF in the next wave
                    # inline; the pipelined deployment refuses such a link
                    feeders.append(f"NF {other.name}" + (
                        " (later in the chain: inline only)" if later else ""))
            if not feeders:
                mine = [types[j].name for j in nf.pubs if types[j].is_a(t)]
                mates = [o.name for o in nfs if o is not nf and nf.group is not None
                         and o.group == nf.group
                         and any(types[j].is_a(t) for j in o.pubs)]
                if mine or mates:
                    who = (f"only it publishes ({', '.join(mine)}): an NF never receives "
                           "its own publications") if mine else (
                        f"only its group's {', '.join(mates)} publish: a member never "
                        "receives the publications of the members it runs beside")
                    raise AppError(f"{at(i)}: NF {nf.name} subscribes to {t.name}, which "
                                   f"{who}")
                offered = sorted({p.name for p in stack_pubs}
                                 | {types[j].name for o in nfs for j in o.pubs})
                # the stack was set to the Network Layer, and the Monitor would
                hint = ("; the TCP Monitor does, but the stack is set to the Network "
                        "Layer: run with --stack auto or tcp (stack = \"auto\" or "
                        "\"tcp\" in an application file)"
                        if any(p.is_a(t) for p in monitor_pubs) else "")
                # a type registered under another parent in each file is two types
                last = t.name.rsplit("/", 1)[-1]
                twins = [n for n in offered if n != t.name and n.rsplit("/", 1)[-1] == last]
                if twins:
                    hint += (f"; {', '.join(twins)} has the same name under another parent: "
                             "a type registered with a different parent is another type")
                raise AppError(
                    f"{at(i)}: NF {nf.name} subscribes to {t.name}, which nothing in the "
                    f"application publishes (a publication must be {t.name} or a "
                    f"descendant; published: {', '.join(offered)}){hint}")
            links.append((nf, t, feeders))
    unused = unused_monitor_options(stack, nfs, options)
    warnings = [unused_warning(unused, stack)] if unused else []
    loop = publication_loop(nfs)
    if loop:
        warnings.append(loop_warning(loop))
    lone = lone_groups_warning(nfs)
    if lone:
        warnings.append(lone)
    spec = AppSpec(path, name, "tcp" if tcp else "network", options, nfs, links, warnings,
                   lines)
    spec.declared_stack = stack
    return spec


def is_app_file(spec):
    return bool(re.search(r"\.toml$", spec or ""))
