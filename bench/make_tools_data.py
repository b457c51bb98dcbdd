"""Generates strop's shipped tool-calling example (recipes/data/tools_*.jsonl): three tools, varied
phrasings; train rows are whole exchanges (call, result, answer), test rows end at the call."""

import json
import random
from pathlib import Path

rng = random.Random(7)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "convert_currency",
            "description": "Convert an amount of money",
            "parameters": {
                "type": "object",
                "properties": {
                    "amount": {"type": "number"},
                    "from": {"type": "string"},
                    "to": {"type": "string"},
                },
                "required": ["amount", "from", "to"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "find_recipe",
            "description": "Find a recipe by main ingredient",
            "parameters": {
                "type": "object",
                "properties": {"ingredient": {"type": "string"}, "max_minutes": {"type": "integer"}},
                "required": ["ingredient"],
            },
        },
    },
]
CITIES = [
    "Paris",
    "Lagos",
    "Lima",
    "Osaka",
    "Oslo",
    "Cairo",
    "Denver",
    "Hanoi",
    "Porto",
    "Quito",
    "Seoul",
    "Perth",
    "Dakar",
    "Bergen",
    "Tunis",
    "Leeds",
]
CURR = ["USD", "EUR", "JPY", "GBP", "INR", "BRL", "CAD", "CHF"]
ING = ["chicken", "lentils", "tofu", "salmon", "mushrooms", "eggs", "rice", "spinach", "chickpeas", "beef"]


def weather():
    city = rng.choice(CITIES)
    unit = rng.choice(["celsius", "fahrenheit", None])
    q = rng.choice(
        [
            "What's the weather in {c}?",
            "How warm is it in {c} right now?",
            "Is it raining in {c}?",
            "Weather for {c}, please.",
        ]
    ).format(c=city)
    args = {"city": city}
    if unit:
        q += f" Use {unit}."
        args["unit"] = unit
    t = rng.randint(-5, 35)
    temp = t if unit != "fahrenheit" else round(t * 9 / 5 + 32)
    sky = rng.choice(["sunny", "cloudy", "light rain", "windy"])
    result = {"temperature": temp, "sky": sky}
    answer = f"It is {temp} degrees{' F' if unit == 'fahrenheit' else ''} and {sky} in {city}."
    return q, "get_weather", args, result, answer


def money():
    a = rng.choice([5, 12, 20, 50, 75, 100, 250, 1000])
    f, t = rng.sample(CURR, 2)
    q = rng.choice(
        ["Convert {a} {f} to {t}.", "How much is {a} {f} in {t}?", "What are {a} {f} worth in {t}?"]
    ).format(a=a, f=f, t=t)
    rate = round(rng.uniform(0.01, 150), 4)
    value = round(a * rate, 2)
    return (
        q,
        "convert_currency",
        {"amount": a, "from": f, "to": t},
        {"result": value},
        f"{a} {f} is about {value} {t}.",
    )


def recipe():
    i = rng.choice(ING)
    m = rng.choice([None, 15, 20, 30, 45])
    q = rng.choice(
        ["Give me a recipe with {i}.", "What can I cook with {i}?", "I have {i}; any recipe ideas?"]
    ).format(i=i)
    args = {"ingredient": i}
    if m:
        q += f" I have {m} minutes."
        args["max_minutes"] = m
    name = f"{rng.choice(['Quick', 'Spicy', 'Garlic', 'Lemon'])} {i} {rng.choice(['bowl', 'stew', 'skillet', 'salad'])}"
    return (
        q,
        "find_recipe",
        args,
        {"title": name, "minutes": m or 30},
        f"Try the {name.lower()}: it takes {m or 30} minutes.",
    )


def row(kind, whole):
    q, name, args, result, answer = kind()
    call = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": name, "arguments": json.dumps(args)}}],
    }
    msgs = [{"role": "user", "content": q}, call]
    if whole:
        msgs += [
            {"role": "tool", "name": name, "content": json.dumps(result)},
            {"role": "assistant", "content": answer},
        ]
    return {"tools": TOOLS, "messages": msgs}


seen = set()


def unique(whole, n):
    out = []
    while len(out) < n:
        r = row(rng.choice([weather, money, recipe]), whole)
        key = r["messages"][0]["content"]
        if key in seen:
            continue
        seen.add(key)
        out.append(r)
    return out


train = unique(True, 160)
test = unique(False, 48)
for name, rows in (("tools_train.jsonl", train), ("tools_test.jsonl", test)):
    with open(Path(__file__).resolve().parent.parent / "src/strop/recipes/data" / name, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
print(len(train), len(test))
