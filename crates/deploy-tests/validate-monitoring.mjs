// Validates prometheus-operator resources against the schemas in the npm package
// @kubernetes-models/prometheus-operator (generated from the operator's Go types).
//
//   node validate-monitoring.mjs <dir holding node_modules> <file.yaml>...
//
// Prints one "OK <Kind>/<name>" or "FAIL <Kind>/<name>: <reasons>" line per document and exits
// 1 if any document failed, is of a kind this script has no schema for (so nothing passes
// unvalidated), or if the files hold no document at all.
//
// The packages are ESM-only and ESM ignores NODE_PATH, so they are imported by file URL from
// the directory given on the command line, through each package's own "exports" map.

import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

const [modulesRoot, ...files] = process.argv.slice(2);
if (!modulesRoot || files.length === 0) {
  console.error("usage: node validate-monitoring.mjs <dir holding node_modules> <file.yaml>...");
  process.exit(2);
}

// Imports `subpath` ("." or "./x") of package `name` as its "exports" map declares it.
async function importExport(name, subpath) {
  const dir = path.join(modulesRoot, "node_modules", name);
  const manifest = JSON.parse(fs.readFileSync(path.join(dir, "package.json"), "utf8"));
  const entry = manifest.exports?.[subpath];
  const target = typeof entry === "string" ? entry : entry?.import ?? entry?.default;
  if (!target) {
    throw new Error(`${name} does not export ${subpath} for import`);
  }
  return import(pathToFileURL(path.join(dir, target)).href);
}

const yaml = await importExport("js-yaml", ".");
const monitoringV1 = await importExport("@kubernetes-models/prometheus-operator", "./monitoring.coreos.com/v1");

// apiVersion + kind -> model class. Anything else fails.
const models = new Map([
  ["monitoring.coreos.com/v1 ServiceMonitor", monitoringV1.ServiceMonitor],
  ["monitoring.coreos.com/v1 PrometheusRule", monitoringV1.PrometheusRule],
]);

function describeErrors(err) {
  if (Array.isArray(err?.errors)) {
    return err.errors.map((e) => `${e.instancePath || "/"} ${e.message}`).join("; ");
  }
  return String(err?.message ?? err);
}

let documents = 0;
let failures = 0;
for (const file of files) {
  for (const doc of yaml.loadAll(fs.readFileSync(file, "utf8"))) {
    if (doc === null || doc === undefined) {
      continue;
    }
    documents += 1;
    const what = `${doc.kind ?? "<no kind>"}/${doc.metadata?.name ?? "<no name>"}`;
    const Model = models.get(`${doc.apiVersion} ${doc.kind}`);
    if (!Model) {
      failures += 1;
      console.log(`FAIL ${what}: no schema for apiVersion ${doc.apiVersion} kind ${doc.kind}`);
      continue;
    }
    try {
      new Model(doc).validate();
      console.log(`OK ${what}`);
    } catch (err) {
      failures += 1;
      console.log(`FAIL ${what}: ${describeErrors(err)}`);
    }
  }
}
if (documents === 0) {
  console.log(`FAIL no documents in ${files.join(", ")}`);
  process.exit(1);
}
process.exit(failures === 0 ? 0 : 1);
