"""The option grammars of node, ruby, perl, bash, the POSIX shells and java: what each one's command line runs.

Each parser follows its interpreter's own source (named at its section), because "the first argument
not starting with a dash" is wrong for nearly all of them: `node -r dotenv/config app.js` would name
`dotenv/config`. An option a parser does not know may take an argument, which would then be taken
for the script, so it gives NoScript rather than a guess. python's grammar, the one that can name a
module rather than a file, is in commandline.py, which dispatches to these (PARSERS) by the
interpreter the kernel reports.
"""

from __future__ import annotations

from collections.abc import Callable

from vouchd.attestors.workload.argv_parsing import (
    OCTAL,
    Arguments,
    EntryPoint,
    NoScript,
    Script,
    leading,
    script_or_stdin,
    unknown_option,
)

__all__ = ["PARSERS"]


# -- node: src/node_options.cc ------------------------------------------------------------------------------------

_NODE_CODE = frozenset({"-e", "--eval", "-p", "--print", "-pe"})
# Options after which the positional argument, if any, is not a program node runs as the main module.
_NODE_NO_PROGRAM = frozenset({
    "-h", "--help", "-v", "--version", "--v8-options", "--completion-bash", "-c", "--check", "--test", "--run",
    "--prof-process", "--build-snapshot", "--build-snapshot-config", "--snapshot-blob", "--experimental-sea-config",
})
# node's options that take a value: `--name=value`, or `--name value` (V8's own take `=value` only).
_NODE_WITH_ARGUMENT = frozenset({
    "-r", "--require", "--import", "--loader", "--experimental-loader", "-C", "--conditions", "--inspect-port",
    "--debug-port", "--title", "--env-file", "--env-file-if-exists", "--input-type", "--experimental-default-type",
    "--icu-data-dir", "--openssl-config", "--redirect-warnings", "--report-dir", "--report-directory",
    "--report-filename", "--report-signal", "--secure-heap", "--secure-heap-min", "--tls-cipher-list", "--tls-keylog",
    "--trace-event-categories", "--trace-event-file-pattern", "--trace-require-module", "--unhandled-rejections",
    "--use-largepages", "--diagnostic-dir", "--disable-proto", "--disable-warning", "--dns-result-order",
    "--heapsnapshot-signal", "--heapsnapshot-near-heap-limit", "--max-http-header-size", "--policy-integrity",
    "--experimental-policy", "--cpu-prof-dir", "--cpu-prof-name", "--cpu-prof-interval", "--heap-prof-dir",
    "--heap-prof-name", "--heap-prof-interval", "--watch-path", "--test-reporter", "--test-reporter-destination",
    "--test-name-pattern", "--test-skip-pattern", "--test-concurrency", "--test-shard", "--test-timeout",
    "--inspect-publish-uid", "--allow-fs-read", "--allow-fs-write", "--network-family-autoselection-attempt-timeout",
    "--v8-pool-size", "--localstorage-file", "--stack-trace-limit",
})
_NODE_FLAGS = frozenset({
    "--abort-on-uncaught-exception", "--allow-addons", "--allow-child-process", "--allow-wasi", "--allow-worker",
    "--cpu-prof", "--disable-wasm-trap-handler", "--disallow-code-generation-from-strings",
    "--enable-etw-stack-walking", "--enable-fips", "--enable-source-maps", "--enable-network-family-autoselection",
    "--experimental-detect-module", "--experimental-eventsource", "--experimental-import-meta-resolve",
    "--experimental-network-imports", "--experimental-network-inspection", "--experimental-permission",
    "--experimental-print-required-tla", "--experimental-require-module", "--experimental-strip-types",
    "--experimental-transform-types", "--experimental-test-coverage", "--experimental-test-module-mocks",
    "--experimental-vm-modules", "--experimental-wasm-modules", "--experimental-websocket",
    "--experimental-global-navigator", "--experimental-shadow-realm", "--expose-gc", "--force-context-aware",
    "--force-fips", "--force-node-api-uncaught-exceptions-policy", "--frozen-intrinsics", "--heap-prof",
    "--huge-max-old-generation-size", "--insecure-http-parser", "--inspect", "--inspect-brk", "--inspect-wait",
    "-i", "--interactive", "--interpreted-frames-native-stack", "--jitless", "--node-memory-debug",
    "--openssl-legacy-provider", "--openssl-shared-config", "--pending-deprecation", "--permission",
    "--preserve-symlinks", "--preserve-symlinks-main", "--prof", "--report-compact", "--report-exclude-network",
    "--report-on-fatalerror", "--report-on-signal", "--report-uncaught-exception", "--throw-deprecation",
    "--tls-max-v1.2", "--tls-max-v1.3", "--tls-min-v1.0", "--tls-min-v1.1", "--tls-min-v1.2", "--tls-min-v1.3",
    "--trace-atomics-wait", "--trace-deprecation", "--trace-exit", "--trace-promises", "--trace-sigint",
    "--trace-sync-io", "--trace-tls", "--trace-uncaught", "--trace-warnings", "--track-heap-objects",
    "--use-bundled-ca", "--use-openssl-ca", "--watch", "--watch-preserve-output", "--zero-fill-buffers",
    "--allow-natives-syntax", "--single-threaded", "--harmony",
})
_NODE_SUFFIXES = (".js", ".json", ".node")  # what node's CommonJS resolution appends, in its order


def _node(args: Arguments) -> EntryPoint:
    while (arg := args.peek()) is not None:
        if arg == "--":
            args.take()
            break
        if arg == "-" or not arg.startswith("-"):
            break
        args.take()
        name, has_value, _ = arg.partition("=")
        if name.startswith("--"):
            name = "--" + name[2:].replace("_", "-")  # node reads --max_old_space_size as --max-old-space-size
        if name in _NODE_CODE:
            return NoScript(f"evaluates the code given with {name}")
        if name in _NODE_NO_PROGRAM:
            return NoScript(f"{name} runs no program of its own")
        if name in _NODE_WITH_ARGUMENT:
            if not has_value and args.take() is None:
                return args.missing(name)
            continue
        if has_value and name.startswith("--"):
            continue  # a V8 option's value, or a node option's, given in the same word
        if name in _NODE_FLAGS or name.startswith(("--no-", "--harmony-")):
            continue
        return unknown_option(name)
    return script_or_stdin(args, stdin="reads its program from standard input, or is a REPL",
                           suffixes=_NODE_SUFFIXES)


# -- ruby: ruby.c, proc_options -----------------------------------------------------------------------------------

_RUBY_FLAGS = frozenset("acdlnpsvwyU")
_RUBY_WITH_ARGUMENT = frozenset("rICXE")  # the rest of the word, or the next word
_RUBY_TAKES_REST = frozenset("xiF")  # the rest of the word, possibly empty
_RUBY_LONG_FLAGS = frozenset({"--debug", "--verbose", "--yydebug", "--jit", "--yjit", "--rjit", "--mjit"})
_RUBY_LONG_WITH_ARGUMENT = frozenset({
    "--enable", "--disable", "--encoding", "--external-encoding", "--internal-encoding", "--dump",
    "--backtrace-limit", "--crash-report", "--parser",
})
_RUBY_LONG_EXITS = frozenset({"--help", "--version", "--copyright"})
_RUBY_LONG_FLAG_PREFIXES = ("--enable-", "--disable-", "--jit-", "--yjit-", "--rjit-", "--mjit-")


def _ruby(args: Arguments) -> EntryPoint:
    searched = False
    while (arg := args.peek()) is not None:
        if arg == "-" or not arg.startswith("-"):
            break
        args.take()
        if arg == "--":
            break
        if arg.startswith("--"):
            name, has_value, _ = arg.partition("=")
            if name in _RUBY_LONG_EXITS:
                return NoScript(f"{name} prints and exits")
            if name in _RUBY_LONG_WITH_ARGUMENT:
                if not has_value and args.take() is None:
                    return args.missing(name)
                continue
            if name in _RUBY_LONG_FLAGS or name.startswith(_RUBY_LONG_FLAG_PREFIXES):
                continue
            return unknown_option(name)
        position = 1
        while position < len(arg):
            letter, position = arg[position], position + 1
            rest = arg[position:]
            if letter == "e":
                return NoScript("runs the code given with -e")
            if letter == "h":
                return NoScript("-h prints and exits")
            if letter in _RUBY_WITH_ARGUMENT:
                # -C and -X change directory before the script is opened: the working directory the
                # process has now is the one its script's name is relative to.
                if not rest and args.take() is None:
                    return args.missing(f"-{letter}")
                break
            if letter in _RUBY_TAKES_REST:
                break
            if letter == "W":
                if rest.startswith(":"):
                    break  # -W:no-deprecated
                position += leading(rest, "012", 1)
            elif letter == "T":
                position += leading(rest, OCTAL, 2)
            elif letter == "0":
                position += leading(rest, OCTAL, 3)
            elif letter == "K":
                position += 1  # one kcode letter
            elif letter == "S":
                searched = True
            elif letter not in _RUBY_FLAGS:
                return unknown_option(f"-{letter}")
    script = args.peek()
    if script == "":
        return NoScript("reads its program from standard input")  # ruby reads an empty name as `-`
    found = script_or_stdin(args)
    if searched and isinstance(found, Script) and "/" not in found.path:
        return NoScript("-S looks for the script along RUBYPATH and PATH")
    return found


# -- perl: perl.c, S_parse_body and moreswitches ------------------------------------------------------------------

_PERL_FLAGS = frozenset("acfnpstTuUwWX")
_PERL_TAKES_REST = frozenset("iFCx")  # the rest of the word, possibly empty


def _perl(args: Arguments) -> EntryPoint:
    searched = changes_directory = False
    while (arg := args.peek()) is not None:
        if arg == "--":
            args.take()
            break
        if arg == "-" or not arg.startswith("-"):
            break
        args.take()
        if arg in ("--help", "--version"):
            return NoScript(f"{arg} prints and exits")
        if arg.startswith("--"):
            return unknown_option(arg)
        position = 1
        while position < len(arg):
            letter, position = arg[position], position + 1
            rest = arg[position:]
            if letter in "eE":
                return NoScript(f"runs the code given with -{letter}")
            if letter in "hvV":
                return NoScript(f"-{letter} prints and exits")
            if letter == "I":
                if not rest and args.take() is None:
                    return args.missing("-I")
                break
            if letter in "mM":
                if not rest:
                    return NoScript(f"-{letter} lacks its module")  # perl: "Missing argument to -M"
                break
            if letter in _PERL_TAKES_REST:
                # -x<dir> changes directory after the script is opened: a relative name is relative
                # to a working directory the process no longer has.
                changes_directory |= letter == "x" and bool(rest)
                break
            if letter == "d":
                if rest.startswith("t") and not (rest[1:2].isalnum() or rest[1:2] == "_"):
                    position, rest = position + 1, rest[1:]
                if rest[:1] in (":", "="):
                    break  # -d:Module=args takes the rest of the word
            elif letter == "l":
                position += leading(rest, OCTAL)
            elif letter == "0":
                if rest[:1] in ("x", "X"):
                    position += 1 + leading(rest[1:], "0123456789abcdefABCDEF")
                else:
                    position += leading(rest, OCTAL)
            elif letter == "S":
                searched = True
            elif letter not in _PERL_FLAGS:
                # -D among them: its debugging flags take letters that are also switches.
                return unknown_option(f"-{letter}")
    found = script_or_stdin(args)
    if isinstance(found, Script) and not found.path.startswith("/"):
        if searched and "/" not in found.path:
            return NoScript("-S looks for the script along PATH")
        if changes_directory:
            return NoScript("-x<dir> left the directory its relative script name was opened from")
    return found


# -- bash and the POSIX shells: bash's shell.c, dash's options.c --------------------------------------------------

_BASH_SET_LETTERS = frozenset("abefhkmnptuvxBCEHPT")
_BASH_INVOCATION_LETTERS = frozenset("ilrD")
_DASH_SET_LETTERS = frozenset("abCefEIimnpuvVx")
_DASH_INVOCATION_LETTERS = frozenset("l")
_BASH_LONG_FLAGS = frozenset({
    "--debug", "--debugger", "--login", "--noediting", "--noprofile", "--norc", "--posix", "--pretty-print",
    "--restricted", "--verbose", "--protected", "--wordexp",
})
_BASH_LONG_WITH_ARGUMENT = frozenset({"--rcfile", "--init-file"})
_BASH_LONG_NO_PROGRAM = frozenset({"--help", "--version", "--dump-strings", "--dump-po-strings"})


def _bash(args: Arguments) -> EntryPoint:
    # Long options come first, before any single-letter one.
    while (arg := args.peek()) is not None and arg.startswith("--") and arg != "--":
        args.take()
        if arg in _BASH_LONG_NO_PROGRAM:
            return NoScript(f"{arg} runs no script")
        if arg in _BASH_LONG_WITH_ARGUMENT:
            if args.take() is None:
                return args.missing(arg)
        elif arg not in _BASH_LONG_FLAGS:
            return unknown_option(arg)
    return _shell(args, set_letters=_BASH_SET_LETTERS, invocation_letters=_BASH_INVOCATION_LETTERS,
                  named_options="oO")


def _sh(args: Arguments) -> EntryPoint:
    return _shell(args, set_letters=_DASH_SET_LETTERS, invocation_letters=_DASH_INVOCATION_LETTERS,
                  named_options="o")


def _shell(args: Arguments, *, set_letters: frozenset[str], invocation_letters: frozenset[str],
           named_options: str) -> EntryPoint:
    """`-abc`, `+abc`, `-o name`, `+o name` (and bash's `-O shopt`), up to `-`, `--` or the first other word."""
    while (arg := args.peek()) is not None:
        if arg in ("-", "--"):  # both end the options
            args.take()
            break
        if len(arg) < 2 or arg[0] not in "-+":
            break
        args.take()
        setting = arg[0] == "-"
        for letter in arg[1:]:
            if setting and letter == "c":
                return NoScript("runs the command string given with -c")
            if setting and letter == "s":
                return NoScript("-s reads its commands from standard input")
            if setting and letter == "D" and "D" in invocation_letters:
                return NoScript("-D lists the strings of its script and runs nothing")
            if letter in named_options:
                # The option's name is always the next word, never the rest of this one.
                if args.take() is None:
                    return args.missing(f"{arg[0]}{letter}")
            elif letter not in set_letters and not (setting and letter in invocation_letters):
                return unknown_option(f"{arg[0]}{letter}")
    return script_or_stdin(args, stdin="reads its commands from standard input, or is interactive")


# -- java: the launcher's options (java(1)) -----------------------------------------------------------------------

_JAVA_WITH_ARGUMENT = frozenset({
    "-cp", "-classpath", "--class-path", "-p", "--module-path", "--upgrade-module-path", "--add-modules",
    "--limit-modules", "--add-reads", "--add-exports", "--add-opens", "--patch-module", "--enable-native-access",
})
_JAVA_FLAGS = frozenset({
    "-server", "-client", "-showversion", "--show-version", "-verbose", "--enable-preview", "--disable-@files",
    "-ea", "-da", "-esa", "-dsa", "-enableassertions", "-disableassertions", "-enablesystemassertions",
    "-disablesystemassertions", "--validate-modules", "-d64",
})
# A flag followed by its value in the same word: -Dkey=value, -Xmx1g, -XX:+UseG1GC, -verbose:gc, -ea:pkg...
_JAVA_ATTACHED_PREFIXES = (
    "-D", "-X", "-ea:", "-da:", "-enableassertions:", "-disableassertions:", "-verbose:", "-agentlib:",
    "-agentpath:", "-javaagent:", "-splash:", "--illegal-access=", "--illegal-native-access=",
    "--finalization=", "--sun-misc-unsafe-memory-access=",
)
_JAVA_NO_PROGRAM = frozenset({
    "-version", "--version", "-fullversion", "--full-version", "-help", "--help", "-h", "-?", "--help-extra",
    "--list-modules", "--dry-run", "-d", "--describe-module", "-m", "--module", "-X",
})


def _java(args: Arguments) -> EntryPoint:
    source = False
    while (arg := args.peek()) is not None:
        if not arg.startswith(("-", "@")):
            break
        args.take()
        if arg.startswith("@"):
            return NoScript("takes options from an @argument file this parser does not read")
        name, has_value, _ = arg.partition("=")
        if arg == "-jar":
            jar = args.take()
            return Script(jar) if jar is not None else args.missing("-jar")
        if name in _JAVA_NO_PROGRAM:
            # -m/--module runs a module's main class: a name, not a file.
            return NoScript(f"{name} runs no file of its own")
        if name == "--source":
            source = True
            if not has_value and args.take() is None:
                return args.missing(name)
            continue
        if name in _JAVA_WITH_ARGUMENT:
            if not has_value and args.take() is None:
                return args.missing(name)
            continue
        if arg in _JAVA_FLAGS or (arg.startswith(_JAVA_ATTACHED_PREFIXES) and arg != "-D"):
            continue
        return unknown_option(name)
    main = args.take()
    if main is None:
        return args.ran_out("names no main class")
    # Since Java 11 a source file is run as a program: a name ending in .java, or any name with --source.
    if source or main.endswith(".java"):
        return Script(main)
    return NoScript("runs a main class, which is not a file")


# By the interpreter names of commandline.INTERPRETERS; python's is commandline's own.
PARSERS: dict[str, Callable[[Arguments], EntryPoint]] = {
    "node": _node,
    "ruby": _ruby,
    "perl": _perl,
    "bash": _bash,
    "sh": _sh,
    "java": _java,
}
