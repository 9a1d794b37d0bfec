print("I forgot to call start()")
