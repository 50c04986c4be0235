#!/usr/bin/env python3
"""Klipper's G-code macro semantics for the fake Moonraker's simulated Klipper (moonflash tests).

Written for moonflash; it copies no Klipper code. It behaves as Klipper v0.13 does in
klippy/extras/gcode_macro.py (template environment, context helpers with their Python signatures, error text),
klippy/configfile.py (config parsing) and klippy/webhooks.py (remote method calls), so that a macro that fails in
Klipper fails here the same way.

  macro-render.py load FILE   -> JSON {"macros": [{section, name, description, gcode, variables}]} of FILE's
                                 [gcode_macro NAME] sections; a config error goes to stderr, exit status 2
  macro-render.py render      <- JSON {name, gcode, variables, params, rawparams, printer, remote_methods} on stdin
                              -> JSON {events, output} or {events, error}; events are, in order:
                                 {"type": "remote_method", "method", "params"}, {"type": "respond_info", "message"},
                                 {"type": "shutdown", "message"}
"""
import ast
import configparser
import json
import sys
import traceback

try:
    import jinja2
except ImportError:
    sys.stderr.write("macro-render.py needs jinja2 for python3, as Klipper does: pip install jinja2, "
                     "or apt-get install python3-jinja2\n")
    sys.exit(3)

# Klipper's webhooks.py encodes with msgspec when it is installed (klippy-requirements.txt lists it), else json;
# the two word an encoding error differently.
try:
    import msgspec

    encode_json = msgspec.json.encode
except ImportError:
    encode_json = json.dumps


def environment():
    # Klipper's delimiters: '{' '}' print an expression, '{%' '%}' are statements.
    return jinja2.Environment("{%", "%}", "{", "}")


class CommandError(Exception):
    """Klipper's printer.command_error; Klipper's console names it gcode.CommandError."""


CommandError.__module__ = "gcode"


class PrinterStatus:
    """`printer[...]`: one printer object's status; a missing object raises KeyError (Jinja makes it undefined)."""

    def __init__(self, status):
        self._status = status

    def __getitem__(self, name):
        key = str(name).strip()
        if key not in self._status:
            raise KeyError(name)
        return self._status[key]

    def __contains__(self, name):
        return str(name).strip() in self._status

    def __iter__(self):
        return iter(self._status)


class PrinterGCodeMacro:
    """The action_* helpers under the class, method names and signatures Klipper gives them, so a wrong call raises
    Klipper's exact TypeError, e.g. "PrinterGCodeMacro._action_call_remote_method() got multiple values for
    argument 'method'"."""

    def __init__(self, remote_methods):
        self.remote_methods = set(remote_methods)
        self.events = []
        self.shut_down = False

    def _shutdown(self, message):
        # Klipper shuts down once; later reasons are only logged.
        if not self.shut_down:
            self.shut_down = True
            self.events.append({"type": "shutdown", "message": message})

    def _action_emergency_stop(self, msg="action_emergency_stop"):
        self._shutdown("Shutdown due to %s" % (msg,))
        return ""

    def _action_respond_info(self, msg):
        self.events.append({"type": "respond_info", "message": str(msg)})
        return ""

    def _action_raise_error(self, msg):
        raise CommandError(msg)

    def _action_call_remote_method(self, method, **kwargs):
        # An unregistered method is a command error that Klipper only logs: the call is dropped.
        if method not in self.remote_methods:
            return ""
        # webhooks sends {"params": kwargs} as JSON; a value JSON cannot encode (a Jinja Undefined from a missing
        # parameter, say) shuts Klipper down with "json encoding error: ...".
        try:
            encode_json({"params": kwargs})
        except (TypeError, ValueError) as e:
            self._shutdown("json encoding error: %s" % (e,))
            return ""
        self.events.append({"type": "remote_method", "method": method, "params": kwargs})
        return ""


def load(path):
    # As Klipper reads printer.cfg: option names lower-cased, continuation lines stripped and joined with "\n",
    # ';' and '#' after whitespace start a comment, even inside gcode.
    parser = configparser.RawConfigParser(strict=False, inline_comment_prefixes=(";", "#"))
    with open(path, encoding="utf-8") as f:
        parser.read_file(f, path)
    env = environment()
    macros = []
    for section in parser.sections():
        words = section.split()
        if words[0] != "gcode_macro":
            continue
        if len(words) != 2:
            raise ValueError("Name of section '%s' contains illegal whitespace" % (section,))
        if not parser.has_option(section, "gcode"):
            raise ValueError("Option 'gcode' in section '%s' must be specified" % (section,))
        gcode = parser.get(section, "gcode")
        try:
            env.from_string(gcode)
        except jinja2.exceptions.TemplateSyntaxError as e:
            lines = gcode.splitlines()
            raise ValueError("Error loading template '%s:gcode'\nline %s: %s # %s"
                             % (section, e.lineno, lines[e.lineno - 1], e.message))
        variables = {}
        for option in parser.options(section):
            if option.startswith("variable_"):
                try:
                    variables[option[len("variable_"):]] = ast.literal_eval(parser.get(section, option))
                except (SyntaxError, TypeError, ValueError) as e:
                    raise ValueError("Option '%s' in section '%s' is not a valid literal: %s" % (option, section, e))
        macros.append({
            "section": section,
            "name": words[1].upper(),
            "description": parser.get(section, "description", fallback="G-Code macro"),
            "gcode": gcode,
            "variables": variables,
        })
    return {"macros": macros}


def render(request):
    helpers = PrinterGCodeMacro(request.get("remote_methods") or [])
    context = dict(request.get("variables") or {})
    context.update({
        "printer": PrinterStatus(request.get("printer") or {}),
        "action_emergency_stop": helpers._action_emergency_stop,
        "action_respond_info": helpers._action_respond_info,
        "action_raise_error": helpers._action_raise_error,
        "action_call_remote_method": helpers._action_call_remote_method,
    })
    context["params"] = dict(request.get("params") or {})
    context["rawparams"] = request.get("rawparams") or ""
    try:
        output = str(environment().from_string(request["gcode"]).render(context))
    except Exception as e:
        # Klipper's wording; the last line of format_exception_only names the type, e.g. "TypeError: ...".
        message = "Error evaluating '%s': %s" % (request["name"], traceback.format_exception_only(type(e), e)[-1])
        return {"events": helpers.events, "error": message}
    return {"events": helpers.events, "output": output}


def main(argv):
    if len(argv) == 3 and argv[1] == "load":
        try:
            result = load(argv[2])
        except (OSError, ValueError, configparser.Error) as e:
            sys.stderr.write("%s\n" % (e,))
            return 2
    elif len(argv) == 2 and argv[1] == "render":
        result = render(json.load(sys.stdin))
    else:
        sys.stderr.write("usage: macro-render.py load FILE | render < request.json\n")
        return 2
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
