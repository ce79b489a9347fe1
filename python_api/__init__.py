"""The high-level layer of unlearn_engine: loading safetensors VLMs, data sets, the unlearning methods (a
registry) and their loop, RAI hooks, ASR evaluation and the `unlearn-engine` command line; the demo world
lives apart in its demo/ subpackage.

This folder, python_api/, is installed as the subpackage `unlearn_engine.api` (setup.py maps it with
package_dir), so its modules import each other as `unlearn_engine.api.<module>`. Users import the facade,
`import unlearn_engine as ue`, which re-exports the names of both layers.
"""
