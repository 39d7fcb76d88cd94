"The requirements that settings.ini lists under a key, one per line, as `pip install -r` reads them."
import shlex
import sys
from configparser import ConfigParser

if __name__ == '__main__':
    settings, key = sys.argv[1:]  # the path of settings.ini; requirements, dev_requirements, ...
    config = ConfigParser(delimiters=['='])
    config.read(settings, encoding='utf-8')
    print('\n'.join(shlex.split(config['DEFAULT'][key])))
