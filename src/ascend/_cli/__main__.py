"""python -m ascend._cli"""

from ascend._cli import main

main()
