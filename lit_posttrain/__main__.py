from lit_posttrain.cli import main

main()
