// zod for the whole project is zod 4's tree-shakable API, zod/mini: import it as a namespace in each module
// (`import * as z from "zod/mini"`, never re-exported, or the bundle keeps all of zod) and import this module
// beside it. zod/mini schemas carry no per-instance method closures and only what is used is bundled: classic
// zod cost ~5 MB of the agent's idle RSS (docs/BENCHMARKS.md). Classic zod installs its English messages by
// itself; zod/mini leaves the locale to the application, so it is set here, for every schema, before any parse.

import { config } from "zod/mini";
import en from "zod/v4/locales/en.js";

config(en());
